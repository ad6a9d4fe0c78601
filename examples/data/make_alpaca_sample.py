"""Regenerate alpaca_sample.json: a few hundred deterministic alpaca-format records (English and Chinese) for demos and tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

HAND_WRITTEN = [
    ("Explain what photosynthesis is in one sentence.", "",
     "Photosynthesis is the process by which plants, algae and some bacteria use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("Give three tips for staying healthy.", "",
     "1. Eat a balanced diet with plenty of vegetables and fruit.\n2. Exercise regularly, for example a brisk 30-minute walk most days.\n3. Sleep seven to nine hours a night."),
    ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    ("Classify the sentiment of this review as positive or negative.", "The battery died after two days and support never answered.", "Negative."),
    ("Classify the sentiment of this review as positive or negative.", "Setup took five minutes and it just works. Love it!", "Positive."),
    ("Summarise the paragraph in one sentence.",
     "The city council met on Tuesday to discuss the new bike lanes. After two hours of debate, members voted 7 to 2 to build lanes on Main Street next spring, citing safety data from nearby towns.",
     "The council voted 7-2 on Tuesday to build bike lanes on Main Street next spring, citing safety data."),
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Name the largest planet in the Solar System.", "", "Jupiter is the largest planet in the Solar System."),
    ("Suggest a name for a bakery that sells only sourdough bread.", "", "\"The Patient Loaf\" — a nod to the slow fermentation behind every sourdough."),
    ("Write a haiku about autumn.", "", "Crisp leaves drift and fall\nthe maple lets go of red\nwind carries the year"),
    ("Explain the difference between a list and a tuple in Python.", "",
     "A list is mutable: you can add, remove or change items after creating it, e.g. `xs.append(4)`.\nA tuple is immutable: once created it cannot change, which makes it hashable and usable as a dictionary key.\nUse a list for a collection that grows; use a tuple for a fixed record such as a coordinate `(x, y)`."),
    ("Fix the bug in this code.", "def add(a, b):\n    return a - b",
     "The function subtracts instead of adding. Corrected version:\n\n```python\ndef add(a, b):\n    return a + b\n```"),
    ("What does this shell command do?", "ls -la | grep '^d'",
     "It lists all entries in the current directory in long format, including hidden ones, and keeps only the lines that start with `d`, i.e. the directories."),
    ("Convert this JSON object to YAML.", "{\"name\": \"qwen\", \"layers\": 24, \"tied\": true}",
     "```yaml\nname: qwen\nlayers: 24\ntied: true\n```"),
    ("", "Translate 'good morning' into Spanish.", "Buenos días."),
    ("", "What is 15% of 80?", "15% of 80 is 12."),
    ("", "请用一句话介绍长城。", "长城是中国古代修建的军事防御工程，全长两万多公里，是世界上最著名的建筑之一。"),
    ("用一句话解释什么是机器学习。", "", "机器学习是让计算机从数据中自动学习规律，并用这些规律对新数据做出预测或决策的方法。"),
    ("给出三个保持健康的建议。", "", "1. 均衡饮食，多吃蔬菜和水果。\n2. 坚持锻炼，每周至少运动三次。\n3. 保证充足睡眠，每晚七到九小时。"),
    ("中国的首都是哪里？", "", "中国的首都是北京。"),
    ("判断下面这句话的情感是正面还是负面。", "这家餐厅的菜又贵又难吃，服务也很差。", "负面。"),
    ("判断下面这句话的情感是正面还是负面。", "老师讲得非常清楚，我终于听懂了！", "正面。"),
    ("把下面这段话概括成一句话。", "今天早上下了一场大雨，很多人没有带伞。地铁站门口挤满了等雨停的人，直到九点以后雨才慢慢变小。",
     "早上的大雨让许多没带伞的人滞留在地铁站，九点后雨才变小。"),
    ("写一首关于春天的四行短诗。", "", "春风吹绿岸边柳，\n细雨轻敲窗前花。\n燕子归来寻旧巢，\n田间处处是新芽。"),
    ("解释 Python 中列表和元组的区别。", "",
     "列表（list）是可变的，创建后可以增删改元素；元组（tuple）是不可变的，创建后不能修改。\n因为不可变，元组可以作为字典的键，适合表示固定的数据，例如坐标 (x, y)。"),
    ("下面的代码有什么问题？", "for i in range(10)\n    print(i)", "`for` 语句末尾缺少冒号。正确写法：\n\n```python\nfor i in range(10):\n    print(i)\n```"),
]

ZH_TRANSLATIONS = [
    ("我喜欢喝茶。", "I like drinking tea."),
    ("今天天气很好。", "The weather is nice today."),
    ("他每天早上跑步。", "He runs every morning."),
    ("这本书很有意思。", "This book is very interesting."),
    ("我们明天去北京。", "We are going to Beijing tomorrow."),
    ("请把门关上。", "Please close the door."),
    ("她会说三种语言。", "She speaks three languages."),
    ("火车晚点了二十分钟。", "The train was twenty minutes late."),
]

WORDS = ["apple", "river", "garden", "silver", "window", "planet", "orange", "castle", "pencil", "forest",
         "yellow", "bridge", "candle", "dragon", "marble", "violin", "harbor", "meadow", "rocket", "tunnel"]
CITIES_ZH = ["北京", "上海", "广州", "深圳", "杭州", "成都", "西安", "南京", "武汉", "重庆"]
ZH_DIGITS = "零一二三四五六七八九"

CODE_TASKS = [
    ("returns the factorial of n", "factorial", "n",
     "    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result"),
    ("checks whether n is a prime number", "is_prime", "n",
     "    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n        if n % k == 0:\n            return False\n        k += 1\n    return True"),
    ("returns the n-th Fibonacci number (fib(0) = 0)", "fib", "n",
     "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    ("reverses a string", "reverse", "s", "    return s[::-1]"),
    ("counts the words in a sentence", "count_words", "sentence", "    return len(sentence.split())"),
    ("returns the greatest common divisor of a and b", "gcd", "a, b",
     "    while b:\n        a, b = b, a % b\n    return a"),
    ("returns the sum of the squares from 1 to n", "sum_of_squares", "n",
     "    return sum(k * k for k in range(1, n + 1))"),
    ("removes duplicates from a list while keeping the order", "dedupe", "items",
     "    seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out"),
]


def zh_number(n: int) -> str:
    """Chinese numerals for 0..9999 (enough for the sample's sums)."""
    if n < 10:
        return ZH_DIGITS[n]
    units = [(1000, "千"), (100, "百"), (10, "十")]
    out, zero = "", False
    for value, name in units:
        d, n = divmod(n, value)
        if d:
            if zero:
                out += "零"
            out += ("" if (value == 10 and d == 1 and not out) else ZH_DIGITS[d]) + name
            zero = False
        elif out:
            zero = True
    if n:
        out += ("零" if zero else "") + ZH_DIGITS[n]
    return out


def generated(rng: random.Random):
    for _ in range(40):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        yield (f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}.")
    for _ in range(25):
        nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
        yield ("Add the following numbers.", ", ".join(map(str, nums)), f"The sum is {sum(nums)}.")
    for _ in range(25):
        ws = rng.sample(WORDS, rng.randint(3, 6))
        yield ("Sort these words alphabetically.", ", ".join(ws), ", ".join(sorted(ws)))
    for _ in range(15):
        w = rng.choice(WORDS)
        vowels = sum(ch in "aeiou" for ch in w)
        yield ("How many vowels are in this word?", w, f"\"{w}\" has {vowels} vowel{'s' if vowels != 1 else ''}.")
    for _ in range(15):
        km = rng.randint(1, 50)
        yield (f"Convert {km} kilometers to meters.", "", f"{km} kilometers is {km * 1000} meters.")
    for _ in range(15):
        c = rng.randint(-20, 40)
        f = c * 9 / 5 + 32
        yield ("Convert the temperature from Celsius to Fahrenheit and show the formula.", f"{c} °C",
               f"F = C × 9/5 + 32\nF = {c} × 9/5 + 32 = {f:g}\nSo {c} °C is {f:g} °F.")
    for _ in range(15):
        n = rng.randint(3, 8)
        yield (f"List the first {n} even numbers, one per line.", "", "\n".join(str(2 * k) for k in range(1, n + 1)))
    for desc, name, args, body in CODE_TASKS:
        yield (f"Write a Python function that {desc}.", "",
               f"```python\ndef {name}({args}):\n{body}\n```")
        yield (f"Write a Python function named `{name}` that {desc}. Keep it short.", "",
               f"Here is one way to write it:\n\n```python\ndef {name}({args}):\n{body}\n```")
    for _ in range(40):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        yield (f"计算 {a} 加 {b} 等于多少？", "", f"{a} 加 {b} 等于 {a + b}（{zh_number(a + b)}）。")
    for _ in range(20):
        nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
        yield ("将以下数字从小到大排序。", "，".join(map(str, nums)), "，".join(map(str, sorted(nums))))
    for zh, en in ZH_TRANSLATIONS:
        yield ("把下面的句子翻译成英文。", zh, en)
        yield ("Translate the following sentence into Chinese.", en, zh)
    for _ in range(15):
        cities = rng.sample(CITIES_ZH, 3)
        yield ("列出三个中国的城市，每行一个。", "", "\n".join(cities))
    for _ in range(10):
        km = rng.randint(1, 50)
        yield (f"{km} 公里等于多少米？", "", f"{km} 公里等于 {km * 1000} 米。")


def build() -> list:
    rng = random.Random(20240607)
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in HAND_WRITTEN]
    records += [{"instruction": i, "input": x, "output": o} for i, x, o in generated(rng)]
    return records


if __name__ == "__main__":
    out = Path(__file__).with_name("alpaca_sample.json")
    records = build()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)  # never leave a half-written sample behind
    print(f"wrote {len(records)} records to {out}")
