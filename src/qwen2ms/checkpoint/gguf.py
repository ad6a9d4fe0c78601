"""Read GGUF files (llama.cpp's format) into a Qwen2ForCausalLM with its tokenizer, or convert them to HF folders."""
from __future__ import annotations

import mmap
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor

from ..config import ConfigError, Qwen2Config
from ..dtypes import resolve_dtype
from ..modeling.model import Qwen2ForCausalLM
from .hf import CheckpointError

__all__ = ["GGUF_TENSOR_TYPES", "load_gguf", "convert_gguf", "gguf_config", "gguf_tokenizer", "gguf_tensor_map",
           "is_gguf_file"]

#: Tensor types read (every other GGML type is refused with a CheckpointError naming the tensor).
GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                     "Q6_K")
_ARCHITECTURES = ("qwen2", "qwen2moe")
_MAGIC = b"GGUF"
_BF16_NP = np.dtype(ms.dtype_to_nptype(ms.bfloat16))
# token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a dependency of qwen2ms; only a broken install lacks it
        raise CheckpointError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    return gguf


def is_gguf_file(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The header: metadata and tensor descriptions
# ---------------------------------------------------------------------------------------------
# GGUF value types (gguf.GGUFValueType): numpy dtype of each fixed-size scalar.
_VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_VALUE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
                8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    type: str  # GGML type name ("F32", "Q8_0", ...), or "type id N" for an id gguf does not know
    shape: Tuple[int, ...]  # numpy order (ggml dims reversed): [out, in] for a linear weight
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class _Header:
    """A parsed GGUF header: ``fields`` maps a key to ``(type name, element type name or None, value)``."""

    path: Path
    version: int
    fields: Dict[str, Tuple[str, Optional[str], Any]]
    tensors: Dict[str, _TensorInfo]


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes; running past the end is a truncated file."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> Any:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"{self.path} is truncated or corrupt: {what} needs {n} bytes at offset "
                                  f"{self.pos}, past the end of the {self.size}-byte file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.u64(what + " length"), what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8 text ({e})") from e

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        dtype = _VALUE_DTYPES.get(vtype)
        if dtype is None:
            raise CheckpointError(f"{self.path}: {what} has unknown GGUF value type {vtype} (the file is corrupt "
                                  "or from a newer GGUF version)")
        item = np.frombuffer(self.take(np.dtype(dtype).itemsize, what), dtype=dtype)[0]
        return bool(item) if vtype == _BOOL else item.item()

    def array(self, what: str) -> Tuple[int, Any]:
        etype, count = self.u32(what + " element type"), self.u64(what + " length")
        if etype == _STRING:
            # Each string is at least its 8-byte length: a count the remaining bytes cannot hold is corrupt.
            if count * 8 > self.size - self.pos:
                raise CheckpointError(f"{self.path} is truncated or corrupt: {what} claims {count} strings, more "
                                      f"than the {self.size - self.pos} bytes left can hold")
            return etype, [self.string(f"{what}[{i}]") for i in range(count)]
        if etype == _ARRAY:
            raise CheckpointError(f"{self.path}: {what} is an array of arrays, which no Qwen2 GGUF field is")
        dtype = _VALUE_DTYPES.get(etype)
        if dtype is None:
            raise CheckpointError(f"{self.path}: {what} has unknown GGUF element type {etype}")
        values = np.frombuffer(self.take(count * np.dtype(dtype).itemsize, what), dtype=dtype)
        return etype, (values.astype(bool) if etype == _BOOL else values).tolist()


def _read_header(path: Path) -> _Header:
    """Parse the metadata and tensor descriptions (the spec in llama.cpp's docs/gguf.md, versions 2 and 3).

    gguf's own GGUFReader builds numpy views per string, which took 12-50 s for Qwen2's 151,936 tokens and
    151,387 merges here; this reads the same header in well under a second, with every read bounds-checked.
    """
    gguf = _gguf()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != _MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file: it does not start with the magic bytes 'GGUF'")
        # Slices of the map are bytes copies, so no view outlives it (closing a map with views raises).
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(_Cursor(mm, path), path, size, gguf)


def _parse(cur: _Cursor, path: Path, size: int, gguf: Any) -> _Header:
    cur.take(4, "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        raise CheckpointError(f"{path} is a big-endian GGUF; qwen2ms reads little-endian files (the default)")
    if version not in (2, 3):
        raise CheckpointError(f"{path} is GGUF version {version}; qwen2ms reads versions 2 and 3")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least that many bytes
        raise CheckpointError(f"{path} is corrupt: it claims {n_tensors} tensors and {n_kv} metadata entries, more "
                              f"than its {size} bytes can hold")
    fields: Dict[str, Tuple[str, Optional[str], Any]] = {}
    for k in range(n_kv):
        key = cur.string(f"metadata key #{k}")
        vtype = cur.u32(f"type of metadata {key!r}")
        if vtype == _ARRAY:
            etype, value = cur.array(f"metadata {key!r}")
            fields[key] = ("ARRAY", _VALUE_NAMES[etype], value)
        else:
            value = cur.value(vtype, f"metadata {key!r}")
            fields[key] = (_VALUE_NAMES[vtype], None, value)
    raw_tensors = []
    for k in range(n_tensors):
        name = cur.string(f"tensor name #{k}")
        n_dims = cur.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {_MAX_DIMS}")
        dims = [cur.u64(f"tensor {name!r} dimension") for _ in range(n_dims)]
        type_id = cur.u32(f"tensor {name!r} type")
        offset = cur.u64(f"tensor {name!r} offset")
        raw_tensors.append((name, dims, type_id, offset))
    alignment = fields.get("general.alignment", ("UINT32", None, 32))
    if alignment[0] != "UINT32" or alignment[2] <= 0 or alignment[2] & (alignment[2] - 1):
        raise CheckpointError(f"{path}: general.alignment is {alignment[2]!r}; it must be a power of two (UINT32)")
    align = int(alignment[2])
    data_start = -(-cur.pos // align) * align
    tensors: Dict[str, _TensorInfo] = {}
    for name, dims, type_id, offset in raw_tensors:
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice")
        shape = tuple(int(d) for d in reversed(dims))
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            tensors[name] = _TensorInfo(name, f"type id {type_id}", shape, data_start + offset, 0)
            continue
        if shape[-1] % block:
            raise CheckpointError(f"{path}: tensor {name!r} has rows of {shape[-1]} values, not a whole number of "
                                  f"{qtype.name} blocks of {block}")
        n = 1
        for d in shape:  # Python ints: a corrupt dimension cannot overflow, it fails the size check below
            n *= d
        tensors[name] = _TensorInfo(name, qtype.name, shape, data_start + offset, n // block * type_size)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    end_prev, prev = data_start, None
    for begin, end, name in spans:
        if end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {end} but the file has "
                                  f"{size} bytes")
        if begin < end_prev:
            what = f"overlaps tensor {prev!r}" if prev else "starts inside the header"
            raise CheckpointError(f"{path} is corrupt: the data of tensor {name!r} {what}")
        end_prev, prev = end, name
    return _Header(path, version, fields, tensors)


def _meta(header: _Header, key: str, kind: str, required: bool = False) -> Any:
    """The value of metadata ``key`` as ``kind`` ("int", "float", "str", "bool", "str_list", "int_list")."""
    path = header.path
    entry = header.fields.get(key)
    if entry is None:
        if required:
            raise CheckpointError(f"{path}: GGUF metadata {key!r} is missing; a Qwen2 GGUF needs it")
        return None
    vtype, etype, value = entry
    is_list = kind.endswith("_list")
    base = kind[:-5] if is_list else kind
    ok = (vtype == "ARRAY" and etype in _SCALARS[base]) if is_list else vtype in _SCALARS[base]
    if not ok:
        found = f"an array of {etype}" if vtype == "ARRAY" else vtype
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is {found}; expected "
                              f"{'an array of ' if is_list else ''}{base}")
    if base == "float":
        # Shortest decimal that round-trips the stored float32 (1e-06, not 9.99999997e-07).
        conv = (lambda v: float(str(np.float32(v)))) if (etype or vtype) == "FLOAT32" else float
        return [conv(v) for v in value] if is_list else conv(value)
    return value


_SCALARS = {"int": ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"),
            "float": ("FLOAT32", "FLOAT64", "UINT32", "INT32", "UINT64", "INT64"),
            "str": ("STRING",), "bool": ("BOOL",)}


def _positive(value: Any, key: str, path: Path) -> int:
    if value is None or value <= 0:
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is {value!r}; it must be a positive integer")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Config and tensor map
# ---------------------------------------------------------------------------------------------
def gguf_config(path: Union[str, os.PathLike]) -> Qwen2Config:
    """The :class:`Qwen2Config` a GGUF file's metadata and tensor shapes describe.

    Raises:
        CheckpointError: not a readable GGUF, another architecture, or missing/invalid metadata.

    Example:
        >>> gguf_config("qwen2-0_5b-instruct-q8_0.gguf").num_hidden_layers  # doctest: +SKIP
        24
    """
    return _config(_read_header(Path(path)))


def _config(header: _Header) -> Qwen2Config:
    path = header.path
    arch = _meta(header, "general.architecture", "str", required=True)
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not a Qwen2 model; qwen2ms reads "
                              f"{' and '.join(repr(a) for a in _ARCHITECTURES)} GGUFs")
    p = arch + "."
    layers = _positive(_meta(header, p + "block_count", "int", True), p + "block_count", path)
    hidden = _positive(_meta(header, p + "embedding_length", "int", True), p + "embedding_length", path)
    heads = _positive(_meta(header, p + "attention.head_count", "int", True), p + "attention.head_count", path)
    kv_heads = _meta(header, p + "attention.head_count_kv", "int")
    kv_heads = heads if kv_heads is None else _positive(kv_heads, p + "attention.head_count_kv", path)
    ffn = _meta(header, p + "feed_forward_length", "int", required=(arch == "qwen2"))
    context = _meta(header, p + "context_length", "int")
    eps = _meta(header, p + "attention.layer_norm_rms_epsilon", "float", True)
    theta = _meta(header, p + "rope.freq_base", "float")
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        value = _meta(header, p + key, "int")
        if value is not None and hidden % heads == 0 and value != hidden // heads:
            raise CheckpointError(f"{path}: GGUF metadata {p + key!r} is {value}, but Qwen2 heads are "
                                  f"embedding_length / head_count = {hidden // heads} wide")
    rope_scaling = None
    kind = _meta(header, p + "rope.scaling.type", "str")
    if kind not in (None, "none", "linear", "yarn"):
        raise CheckpointError(f"{path}: GGUF rope scaling type {kind!r} is not supported; qwen2ms reads "
                              "'none', 'linear' and 'yarn'")
    if kind not in (None, "none"):
        factor = _meta(header, p + "rope.scaling.factor", "float", True)
        if kind == "linear":
            rope_scaling = {"rope_type": "linear", "factor": factor}
        elif kind == "yarn":
            orig = _meta(header, p + "rope.scaling.original_context_length", "int", True)
            rope_scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    infos = header.tensors
    if layers * 9 > len(infos):  # every layer has at least 9 tensors; refuse before building a huge tensor map
        raise CheckpointError(f"{path}: {p}block_count is {layers}, but the file holds only {len(infos)} tensors "
                              f"(a Qwen2 layer has at least 9)")
    embd = infos.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing; a Qwen2 GGUF needs it")
    vocab = embd.shape[0] if len(embd.shape) == 2 else 0
    tokens = header.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and tokens[0] == "ARRAY" and len(tokens[2]) > vocab:
        raise CheckpointError(f"{path}: the token list has {len(tokens[2])} tokens but token_embd.weight only "
                              f"{vocab} rows")
    kwargs: Dict[str, Any] = dict(
        vocab_size=_positive(vocab, "token_embd.weight rows", path), hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=int(context) if context else 32768, rms_norm_eps=eps,
        rope_theta=theta if theta is not None else 10000.0, rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in infos,
        qkv_bias="blk.0.attn_q.bias" in infos, use_sliding_window=False,
        bos_token_id=_meta(header, "tokenizer.ggml.bos_token_id", "int"),
        eos_token_id=_meta(header, "tokenizer.ggml.eos_token_id", "int"),
        pad_token_id=_meta(header, "tokenizer.ggml.padding_token_id", "int"),
    )
    if ffn is not None:
        kwargs["intermediate_size"] = int(ffn)
    if arch == "qwen2moe":
        experts = _positive(_meta(header, p + "expert_count", "int", True), p + "expert_count", path)
        used = _positive(_meta(header, p + "expert_used_count", "int", True), p + "expert_used_count", path)
        moe_ffn = _meta(header, p + "expert_feed_forward_length", "int")
        if moe_ffn is None:  # older converters wrote only feed_forward_length, the experts' size
            moe_ffn = ffn
        shared = _meta(header, p + "expert_shared_feed_forward_length", "int")
        if shared is None:
            shared = infos["blk.0.ffn_gate_shexp.weight"].shape[0] if "blk.0.ffn_gate_shexp.weight" in infos else 0
        # llama.cpp's qwen2moe graph never renormalises the top-k weights and makes every layer sparse.
        norm = _meta(header, p + "expert_weights_norm", "bool")
        kwargs.update(model_type="qwen2_moe", num_experts=experts, num_experts_per_tok=used,
                      moe_intermediate_size=_positive(moe_ffn, p + "expert_feed_forward_length", path),
                      shared_expert_intermediate_size=int(shared), norm_topk_prob=bool(norm),
                      decoder_sparse_step=1, mlp_only_layers=[])
        kwargs.setdefault("intermediate_size", int(moe_ffn))
    try:
        config = Qwen2Config(**kwargs)
        config.validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: the GGUF metadata describe no valid Qwen2 model: {e}") from e
    return config


@dataclass(frozen=True)
class _Target:
    param: str  # our (HF) parameter name
    shape: Tuple[int, ...]  # the GGUF tensor's expected numpy shape
    part: Optional[str] = None  # "gate" / "up": half of a stacked experts.gate_up_proj


def gguf_tensor_map(config: Qwen2Config) -> Dict[str, _Target]:
    """Every GGUF tensor name a Qwen2 / Qwen2-MoE model of ``config`` has, with its HF parameter and shape."""
    h, d, v = config.hidden_size, config.head_dim, config.vocab_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    out: Dict[str, _Target] = {"token_embd.weight": _Target("model.embed_tokens.weight", (v, h)),
                               "output_norm.weight": _Target("model.norm.weight", (h,))}
    if not config.tie_word_embeddings:
        out["output.weight"] = _Target("lm_head.weight", (v, h))
    for i in range(config.num_hidden_layers):
        b, m = f"blk.{i}.", f"model.layers.{i}."
        out[b + "attn_norm.weight"] = _Target(m + "input_layernorm.weight", (h,))
        out[b + "ffn_norm.weight"] = _Target(m + "post_attention_layernorm.weight", (h,))
        for g, name, rows in (("q", "q_proj", q), ("k", "k_proj", kv), ("v", "v_proj", kv)):
            out[f"{b}attn_{g}.weight"] = _Target(f"{m}self_attn.{name}.weight", (rows, h))
            if config.qkv_bias:
                out[f"{b}attn_{g}.bias"] = _Target(f"{m}self_attn.{name}.bias", (rows,))
        out[b + "attn_output.weight"] = _Target(m + "self_attn.o_proj.weight", (h, q))
        if config.is_sparse_layer(i):
            e, i_moe, s = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
            out[b + "ffn_gate_inp.weight"] = _Target(m + "mlp.gate.weight", (e, h))
            out[b + "ffn_gate_exps.weight"] = _Target(m + "mlp.experts.gate_up_proj", (e, i_moe, h), "gate")
            out[b + "ffn_up_exps.weight"] = _Target(m + "mlp.experts.gate_up_proj", (e, i_moe, h), "up")
            out[b + "ffn_down_exps.weight"] = _Target(m + "mlp.experts.down_proj", (e, h, i_moe))
            if s:
                out[b + "ffn_gate_inp_shexp.weight"] = _Target(m + "mlp.shared_expert_gate.weight", (1, h))
                for g in ("gate", "up"):
                    out[f"{b}ffn_{g}_shexp.weight"] = _Target(f"{m}mlp.shared_expert.{g}_proj.weight", (s, h))
                out[b + "ffn_down_shexp.weight"] = _Target(m + "mlp.shared_expert.down_proj.weight", (h, s))
        else:
            f = config.intermediate_size
            out[b + "ffn_gate.weight"] = _Target(m + "mlp.gate_proj.weight", (f, h))
            out[b + "ffn_up.weight"] = _Target(m + "mlp.up_proj.weight", (f, h))
            out[b + "ffn_down.weight"] = _Target(m + "mlp.down_proj.weight", (h, f))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def gguf_tokenizer(path: Union[str, os.PathLike]):
    """The :class:`qwen2ms.Qwen2Tokenizer` stored in a GGUF file's metadata (``tokenizer.ggml.*``, chat template).

    Normal tokens form the BPE vocabulary, control and user-defined tokens become added tokens (control ones
    special), llama.cpp's ``[PAD<id>]`` fillers (type "unused") are dropped, so ids past the real vocabulary
    are not decodable, as in the Hugging Face tokenizer. BOS is only set when the file asks for it to be added.

    Raises:
        CheckpointError: not a readable GGUF, no or another kind of tokenizer (the GGUF must hold a "gpt2"
            byte-level BPE with Qwen2's pre-tokenizer), or inconsistent token metadata.

    Example:
        >>> gguf_tokenizer("qwen2-0_5b-instruct-q8_0.gguf").encode("Hello world")  # doctest: +SKIP
        [9707, 1879]
    """
    header = _read_header(Path(path))
    context = _meta(header, f"{_meta(header, 'general.architecture', 'str')}.context_length", "int")
    return _tokenizer(header, context)


def _tokenizer(header: _Header, model_max_length: Optional[int] = None):
    from ..tokenization import AddedToken, Qwen2Tokenizer, TokenizerError
    from ..tokenization.bpe import parse_merges

    path = header.path
    model = _meta(header, "tokenizer.ggml.model", "str")
    if model is None:
        raise CheckpointError(f"{path} holds no tokenizer (no 'tokenizer.ggml.model' metadata)")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {model!r}; Qwen2 tokenizers are byte-level BPE "
                              "('gpt2')")
    pre = _meta(header, "tokenizer.ggml.pre", "str")
    if pre not in ("qwen2", None):
        raise CheckpointError(f"{path}: tokenizer.ggml.pre is {pre!r}; qwen2ms tokenizes with Qwen2's "
                              "pre-tokenizer ('qwen2') only")
    tokens = _meta(header, "tokenizer.ggml.tokens", "str_list", True)
    types = _meta(header, "tokenizer.ggml.token_type", "int_list")
    if types is None:
        types = [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    merges_raw = _meta(header, "tokenizer.ggml.merges", "str_list", True)
    vocab: Dict[str, int] = {}
    added: List[AddedToken] = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (_NORMAL, _BYTE):
            vocab[tok] = i
        elif kind in (_CONTROL, _UNKNOWN):
            added.append(AddedToken(tok, i, special=True))
        elif kind == _USER_DEFINED:
            added.append(AddedToken(tok, i, special=False))
        # _UNUSED: llama.cpp's [PAD<id>] fillers up to the embedding size, not tokens of the vocabulary.

    def special(key: str) -> Optional[str]:
        idx = _meta(header, f"tokenizer.ggml.{key}_token_id", "int")
        if idx is None:
            return None
        if not 0 <= idx < len(tokens) or types[idx] == _UNUSED:
            raise CheckpointError(f"{path}: tokenizer.ggml.{key}_token_id is {idx}, not a token of the vocabulary")
        return tokens[idx]

    add_bos = _meta(header, "tokenizer.ggml.add_bos_token", "bool")
    template = _meta(header, "tokenizer.chat_template", "str")
    try:
        merges = parse_merges(merges_raw, source=f"{path} tokenizer.ggml.merges")
        return Qwen2Tokenizer(vocab, merges, added_tokens=added, eos_token=special("eos"), pad_token=special("padding"),
                              unk_token=special("unknown"), bos_token=special("bos") if add_bos else None,
                              chat_template=template, model_max_length=model_max_length or 32768)
    except TokenizerError as e:
        raise CheckpointError(f"{path}: the GGUF tokenizer metadata do not form a Qwen2 tokenizer: {e}") from e


# ---------------------------------------------------------------------------------------------
# Tensor data
# ---------------------------------------------------------------------------------------------
def _read_bytes(f, info: _TensorInfo, path: Path) -> np.ndarray:
    buf = np.empty(info.nbytes, dtype=np.uint8)
    f.seek(info.offset)
    got = f.readinto(memoryview(buf))
    if got != info.nbytes:
        raise CheckpointError(f"{path} is truncated: read {got} of {info.nbytes} bytes of tensor {info.name!r}")
    return buf


def _to_storage(arr: np.ndarray, storage: Any) -> np.ndarray:
    """A float array in the storage dtype (a new array, or ``arr`` itself when it already is one)."""
    target = np.dtype(ms.dtype_to_nptype(storage))
    if arr.dtype == target:
        return arr
    if arr.dtype == _BF16_NP and target == np.float32:
        # bfloat16 is the top half of a float32: widening is an exact shift.
        return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    # Through MindSpore, which rounds to bfloat16/float16 the way torch does.
    return Tensor.from_numpy(np.ascontiguousarray(arr)).astype(storage).asnumpy()


_CHUNK_BYTES = 8 << 20  # float32 bytes converted at a time: temporaries stay small next to the weights


def _values(raw: np.ndarray, info: _TensorInfo, storage: Any, check_finite: bool, name: str, path: Path) -> np.ndarray:
    """The tensor as an array of the storage dtype and its numpy shape, converted a few MB of rows at a time.

    A float tensor already in the storage dtype is a view of ``raw`` (the buffer it was read into), no copy.

    Raises:
        CheckpointError: ``check_finite`` and a NaN or Inf value.
    """
    target = np.dtype(ms.dtype_to_nptype(storage))
    floats = {"F32": np.float32, "F16": np.float16, "BF16": _BF16_NP}
    if info.type in floats:
        rows = raw.view(floats[info.type]).reshape(-1, info.shape[-1])
        convert = None if rows.dtype == target else (lambda chunk: _to_storage(chunk, storage))
    else:
        gguf = _gguf()
        qtype = gguf.GGMLQuantizationType[info.type]
        rows = raw.reshape(-1, gguf.quant_shape_to_byte_shape(info.shape, qtype)[-1])

        def convert(chunk):
            return _to_storage(gguf.quants.dequantize(chunk, qtype), storage)

    out = rows if convert is None else np.empty((rows.shape[0], info.shape[-1]), dtype=target)
    step = max(1, _CHUNK_BYTES // (4 * info.shape[-1]))
    for i in range(0, rows.shape[0], step):
        if convert is not None:
            out[i:i + step] = convert(rows[i:i + step])
        chunk = out[i:i + step]
        if check_finite and not np.isfinite(chunk if chunk.dtype != _BF16_NP else _to_storage(chunk, ms.float32)).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values; the weights are corrupt "
                                  "(check_finite=False loads them anyway)")
    return out.reshape(info.shape)


def _q8_0_blocks(raw: np.ndarray, info: _TensorInfo) -> Tuple[np.ndarray, np.ndarray]:
    """Q8_0 ``[N, K]`` as int8 codes ``[N, K]`` and float32 scales ``[N, K / 32]`` (value = code * scale)."""
    n, k = info.shape
    blocks = raw.reshape(n, k // 32, 34)  # per block: fp16 scale, then 32 int8 codes
    scale = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n, k)
    return codes, scale


def _q4_0_blocks(raw: np.ndarray, info: _TensorInfo) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_0 ``[N, K]`` as packed int4 codes ``[N, K / 2]`` (uint8, Q4_0's own nibble layout, which is the int4
    kernels': see :func:`qwen2ms.ops.reference.dequantize_int4`) and float32 scales ``[N, K / 32]``."""
    n, k = info.shape
    blocks = raw.reshape(n, k // 32, 18)  # per block: fp16 scale, then 16 bytes of two nibbles each
    scale = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    codes = np.ascontiguousarray(blocks[:, :, 2:]).reshape(n, k // 2)
    return codes, scale


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _plan(infos: Dict[str, _TensorInfo], expected: Dict[str, _Target], path: Path) -> None:
    missing = [name for name in expected if name not in infos]
    unexpected = [name for name in infos if name not in expected]
    mismatched, bad_type = [], []
    for name, target in expected.items():
        info = infos.get(name)
        if info is None:
            continue
        shape = info.shape
        if name.endswith("ffn_gate_inp_shexp.weight") and shape == target.shape[1:]:
            shape = target.shape  # some converters store the shared-expert gate as a vector
        if shape != target.shape:
            mismatched.append(f"{name}: file {list(info.shape)} vs model {list(target.shape)}")
        if info.type not in GGUF_TENSOR_TYPES:
            bad_type.append(f"{name}: {info.type}")
    if missing or unexpected or mismatched or bad_type:
        parts = [f"GGUF file {path} does not fit the Qwen2 model its metadata describe:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                             (f"unsupported tensor type (qwen2ms reads {', '.join(GGUF_TENSOR_TYPES)})",
                              bad_type)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(parts))


def _default_dtype(infos: Dict[str, _TensorInfo]) -> Any:
    weight = Counter()
    for info in infos.values():
        if len(info.shape) >= 2:
            weight[info.type] += int(np.prod(info.shape, dtype=np.int64))
    dominant = weight.most_common(1)[0][0] if weight else "F32"
    # Quantised files: bfloat16 keeps dequantised weights at half the memory of float32 (dtype="float32" for
    # the exact values); Q8_0 linear weights stay int8 either way.
    return {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}.get(dominant, ms.bfloat16)


def _cells(model: Qwen2ForCausalLM) -> Dict[str, Any]:
    return {name: cell for name, cell in model.cells_and_names()}


def load_gguf(path: Union[str, os.PathLike], dtype: Any = None, dequantize: bool = False,
              ops_backend: Optional[str] = None, check_finite: bool = True) -> Qwen2ForCausalLM:
    """Build a :class:`Qwen2ForCausalLM` (and its tokenizer) from a GGUF file.

    Args:
        path: a ``.gguf`` file of architecture "qwen2" or "qwen2moe" (one file; split GGUFs are not read).
        dtype: storage dtype of the float weights ("float32", "float16", "bfloat16" or a MindSpore dtype).
            None: the file's own float type for F32/F16/BF16 files, bfloat16 for quantised files
            (pass "float32" to keep dequantised values exact).
        dequantize: False keeps Q8_0 linear weights as int8 codes and Q4_0 ones as packed int4 codes, with
            per-32 scales (exactly the file's values, a quarter or an eighth of float32's bytes); True makes
            every weight a float of ``dtype``.
        ops_backend: the model's ops backend (see :class:`Qwen2ForCausalLM`).
        check_finite: refuse weights holding NaN or Inf (they would generate garbage silently).

    Returns:
        The model with ``tokenizer`` (from the GGUF metadata; None with a warning when that fails)
        and ``generation_config_dict`` None (a GGUF holds no generation settings).

    Tensor names map to the Hugging Face keys in one table (:func:`gguf_tensor_map`). llama.cpp's converter
    stores Qwen2's q/k weights unpermuted (only its llama family permutes them), so the mapping is a rename
    plus, for Qwen2-MoE, stacking the gate and up experts into ``gate_up_proj``. F32/F16/BF16 tensors are
    read as they are; Q8_0 linear weights stay int8 and Q4_0 ones int4 unless ``dequantize`` (32 int8 codes,
    or 16 bytes of nibbles, and one fp16 scale per block of 32 inputs are exactly the int8/int4 kernels'
    per-group layouts with groups of 32: no requantisation error), a Q8_0 embedding table stays int8 with
    its per-block scales (so does the tied lm_head that shares it); other quantised tensors (and Q4_0
    embeddings and MoE experts) are dequantised
    with ``gguf.quants.dequantize``. Tensors are read one at a time straight from the file (no memory
    map whose pages would count twice), so loading peaks at about one copy of the weights plus one tensor.

    Raises:
        CheckpointError: the file is missing, not a GGUF, truncated or corrupt; another architecture;
            missing, unexpected or mis-shaped tensors, or tensor types qwen2ms cannot read (all listed in
            one message); non-finite weights.

    Example:
        >>> model = Qwen2ForCausalLM.from_gguf("qwen2-0_5b-instruct-q8_0.gguf")  # doctest: +SKIP
        >>> model.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=16)  # doctest: +SKIP
    """
    path = Path(path)
    header = _read_header(path)
    config = _config(header)
    infos = header.tensors
    expected = gguf_tensor_map(config)
    _plan(infos, expected, path)
    storage = resolve_dtype(dtype) if dtype is not None else _default_dtype(infos)
    try:
        tokenizer = _tokenizer(header, model_max_length=config.max_position_embeddings)
    except CheckpointError as e:  # a broken tokenizer must not make the weights unloadable
        warnings.warn(f"{e}; model.tokenizer is None", stacklevel=3)
        tokenizer = None
    del header  # the token list and merges are held by the tokenizer now

    model = Qwen2ForCausalLM(config, dtype=storage, init_weights=False, ops_backend=ops_backend)
    params = {p.name: p for p in model.get_parameters()}
    cells = _cells(model)
    from ..modeling.model import Embedding

    stacks: Dict[str, np.ndarray] = {}  # experts.gate_up_proj being assembled from its gate and up halves
    # Sequential reads in file order.
    order = sorted(expected, key=lambda n: infos[n].offset)
    with open(path, "rb") as f:
        for name in order:
            info, target = infos[name], expected[name]
            raw = _read_bytes(f, info, path)
            cell = cells.get(target.param.rsplit(".", 1)[0])
            as_int8 = (info.type in ("Q8_0", "Q4_0") and not dequantize and target.part is None
                       and len(info.shape) == 2 and cell is not None and hasattr(cell, "weight_scale")
                       and (info.type == "Q8_0" or not isinstance(cell, Embedding))
                       and target.param.endswith(".weight"))
            # Q8_0 as int8 codes, Q4_0 as packed int4 codes: the file's blocks as they are. A Q8_0 embedding table
            # stays int8 too (llama-quantize writes token_embd as Q8_0 in Q8_0 and Q4_0 files): read as bfloat16
            # it was twice the bytes a tied lm_head streams per decode step.
            if as_int8:
                codes, scale = (_q8_0_blocks if info.type == "Q8_0" else _q4_0_blocks)(raw, info)
                if check_finite and not np.isfinite(scale).all():
                    raise CheckpointError(f"{path}: tensor {name!r} has non-finite {info.type} scales (NaN/Inf); the "
                                          "file is corrupt (check_finite=False loads it anyway)")
                cell.weight = Parameter(Tensor(codes), name=target.param, requires_grad=False)
                cell.weight_scale = Parameter(Tensor(scale), name=target.param + "_scale", requires_grad=False)
                continue
            arr = _values(raw, info, storage, check_finite, name, path)
            del raw  # a view of it lives on in arr when no conversion was needed
            param = params[target.param]
            if target.part is None:
                param.set_data(Tensor.from_numpy(np.ascontiguousarray(arr.reshape(tuple(param.shape)))))
                continue
            inter = param.shape[1] // 2
            half = slice(0, inter) if target.part == "gate" else slice(inter, None)
            if target.param not in stacks:  # the first half; _plan checked that the other one exists
                stacks[target.param] = np.empty(tuple(param.shape), dtype=arr.dtype)
                stacks[target.param][:, half] = arr
            else:
                stacks[target.param][:, half] = arr
                param.set_data(Tensor.from_numpy(stacks.pop(target.param)))
    model.generation_config_dict = None
    model.tokenizer = tokenizer
    return model


def convert_gguf(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], dtype: Any = None,
                 max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write a GGUF file as a Hugging Face folder: config.json, safetensors, tokenizer files.

    Every weight is dequantised to ``dtype`` (safetensors holds no GGML block types); the result loads with
    ``Qwen2ForCausalLM.from_hf`` and ``transformers.AutoModelForCausalLM``. This is ``qwen2ms convert x.gguf DST``.

    Args:
        src: the ``.gguf`` file.
        dst: the output folder (created; its earlier weights are replaced atomically per file).
        dtype: dtype of the written weights; None as in :func:`load_gguf` (the file's float type,
            bfloat16 for quantised files).
        max_shard_size: largest safetensors shard.

    Returns:
        The output folder.

    Raises:
        CheckpointError: see :func:`load_gguf`.

    Example:
        >>> convert_gguf("qwen2-0_5b-instruct-q8_0.gguf", "qwen2-0.5b-hf", dtype="bfloat16")  # doctest: +SKIP
    """
    model = load_gguf(src, dtype=dtype, dequantize=True)
    dst = Path(dst)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    return dst
