"""The embedded demo corpus: small, bilingual (English/Chinese), written for this package.

Sentences are composed from aligned English/Chinese phrase tables (subject, activity, place, time), so every
English sentence has an exact Chinese translation and graded similarity comes from how many parts two sentences
share. Deterministic: the same rows on every machine, no download. Used by the demo pipeline
(`examples/finetune.py`), the demo tokenizer and tests; real runs point the stages at real data instead.
"""

from __future__ import annotations

import itertools
import random

#: Languages of the demo corpus (the model card lists them for models trained on it).
LANGUAGES = ("en", "zh")

SUBJECTS = [
    ("My sister", "我的姐姐"), ("The teacher", "老师"), ("A young doctor", "一位年轻的医生"),
    ("The old farmer", "那位老农民"), ("Our neighbour", "我们的邻居"), ("The little boy", "那个小男孩"),
    ("The engineer", "工程师"), ("My grandfather", "我的爷爷"), ("The students", "学生们"),
    ("A tourist from Spain", "一位来自西班牙的游客"), ("The chef", "厨师"), ("The cat", "那只猫"),
]
ACTIVITIES = [
    ("reads a book", "看一本书"), ("cooks noodles", "煮面条"), ("plays the piano", "弹钢琴"),
    ("drinks green tea", "喝绿茶"), ("writes a letter", "写一封信"), ("repairs a bicycle", "修自行车"),
    ("sleeps", "睡觉"), ("paints a picture", "画一幅画"), ("waits for the bus", "等公交车"),
    ("studies mathematics", "学习数学"), ("sings a song", "唱一首歌"), ("buys vegetables", "买蔬菜"),
]
PLACES = [
    ("in the park", "在公园里"), ("at home", "在家里"), ("in the library", "在图书馆"),
    ("by the river", "在河边"), ("in the kitchen", "在厨房里"), ("at the station", "在车站"),
    ("in the garden", "在花园里"), ("at school", "在学校"),
]
TIMES = [
    ("every morning", "每天早上"), ("on Sunday", "星期天"), ("in the evening", "晚上"),
    ("after lunch", "午饭后"), ("in winter", "冬天"), ("today", "今天"),
]

FACTS = [
    ("What is the capital of France?", "Paris is the capital and largest city of France.",
     "法国的首都是哪里？", "巴黎是法国的首都和最大城市。"),
    ("How many legs does a spider have?", "A spider has eight legs.",
     "蜘蛛有几条腿？", "蜘蛛有八条腿。"),
    ("What do bees make?", "Bees collect nectar and make honey.",
     "蜜蜂制造什么？", "蜜蜂采集花蜜并酿造蜂蜜。"),
    ("Why is the sky blue?", "Sunlight is scattered by air molecules, and blue light scatters the most.",
     "天空为什么是蓝色的？", "阳光被空气分子散射，蓝光散射得最多。"),
    ("What is the boiling point of water?", "At sea level water boils at 100 degrees Celsius.",
     "水的沸点是多少？", "在海平面上，水在摄氏一百度沸腾。"),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun.",
     "哪颗行星离太阳最近？", "水星是离太阳最近的行星。"),
    ("What do pandas eat?", "Giant pandas eat mostly bamboo.",
     "熊猫吃什么？", "大熊猫主要吃竹子。"),
    ("How long is a year on Earth?", "A year on Earth lasts about 365 days.",
     "地球上的一年有多长？", "地球上的一年大约是三百六十五天。"),
    ("What is the largest ocean?", "The Pacific is the largest and deepest ocean.",
     "最大的海洋是哪个？", "太平洋是最大最深的海洋。"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "谁写了《罗密欧与朱丽叶》？", "威廉·莎士比亚写了《罗密欧与朱丽叶》。"),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide and release oxygen.",
     "植物吸收什么气体？", "植物吸收二氧化碳并释放氧气。"),
    ("How many continents are there?", "There are seven continents on Earth.",
     "地球上有几个大洲？", "地球上有七个大洲。"),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain above sea level.",
     "最高的山是哪座？", "珠穆朗玛峰是海拔最高的山。"),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere, many in Antarctica.",
     "企鹅生活在哪里？", "大多数企鹅生活在南半球，很多在南极洲。"),
    ("What is the speed of light?", "Light travels about 300,000 kilometres per second.",
     "光速是多少？", "光每秒大约传播三十万公里。"),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil.",
     "巴西说什么语言？", "葡萄牙语是巴西的官方语言。"),
]


def _sentence(parts: tuple[int, int, int, int], lang: str) -> str:
    s, a, p, t = parts
    if lang == "en":
        return f"{SUBJECTS[s][0]} {ACTIVITIES[a][0]} {PLACES[p][0]} {TIMES[t][0]}."
    return f"{SUBJECTS[s][1]}{TIMES[t][1]}{PLACES[p][1]}{ACTIVITIES[a][1]}。"


def _all_parts(seed: int = 0, n: int = 240) -> list[tuple[int, int, int, int]]:
    grid = list(itertools.product(range(len(SUBJECTS)), range(len(ACTIVITIES)), range(len(PLACES)), range(len(TIMES))))
    return random.Random(seed).sample(grid, n)


def demo_texts() -> list[str]:
    """Plain text in both languages (tokenizer training and LM pre-training)."""
    texts = []
    for parts in _all_parts():
        texts += [_sentence(parts, "en"), _sentence(parts, "zh")]
    for q_en, a_en, q_zh, a_zh in FACTS:
        texts += [q_en, a_en, q_zh, a_zh]
    return texts


def demo_instructions() -> list[dict[str, str]]:
    """(instruction, input, output) rows for SFT (stage 2) and, as query/passage pairs, for stage 3."""
    rows = []
    for q_en, a_en, q_zh, a_zh in FACTS:
        rows.append({"instruction": "Answer the question.", "input": q_en, "output": a_en})
        rows.append({"instruction": "回答问题。", "input": q_zh, "output": a_zh})
    for parts in _all_parts(seed=1, n=96):
        en, zh = _sentence(parts, "en"), _sentence(parts, "zh")
        rows.append({"instruction": "Translate into Chinese.", "input": en, "output": zh})
        rows.append({"instruction": "翻译成英文。", "input": zh, "output": en})
    return rows


def demo_pairs() -> list[dict[str, str]]:
    """(query, positive) retrieval pairs: questions → answers in both languages and cross-lingual."""
    rows = []
    for q_en, a_en, q_zh, a_zh in FACTS:
        rows += [
            {"query": q_en, "positive": a_en},
            {"query": q_zh, "positive": a_zh},
            {"query": q_zh, "positive": a_en},
            {"query": q_en, "positive": a_zh},
        ]
    for parts in _all_parts(seed=2, n=120):
        rows.append({"query": _sentence(parts, "en"), "positive": _sentence(parts, "zh")})
    return rows


def demo_sts(n: int = 300, seed: int = 3) -> list[dict]:
    """Sentence pairs with a 0-5 similarity score: 5 for translations, else 5/4 per shared part (subject, activity,
    place, time), in the same or the other language."""
    rng = random.Random(seed)
    rows = []
    parts = _all_parts(seed=seed, n=n)
    for i, a in enumerate(parts):
        b = list(a)
        keep = rng.randint(0, 4)
        for k in rng.sample(range(4), 4 - keep):
            size = (len(SUBJECTS), len(ACTIVITIES), len(PLACES), len(TIMES))[k]
            b[k] = (a[k] + rng.randint(1, size - 1)) % size
        b = tuple(b)
        shared = sum(x == y for x, y in zip(a, b))
        lang_a, lang_b = ("en", "en") if i % 3 == 0 else ("zh", "zh") if i % 3 == 1 else ("en", "zh")
        rows.append({"sentence1": _sentence(a, lang_a), "sentence2": _sentence(b, lang_b), "score": 5.0 * shared / 4})
    return rows


#: Category of each activity (same order as ACTIVITIES), the labels of the demo classification task.
ACTIVITY_LABELS = [
    ("reading", "阅读"), ("cooking", "烹饪"), ("music", "音乐"), ("drinks", "饮品"), ("writing", "写作"),
    ("repairs", "修理"), ("rest", "休息"), ("art", "美术"), ("travel", "出行"), ("study", "学习"),
    ("singing", "唱歌"), ("shopping", "购物"),
]


def _one_part_variants(parts: tuple[int, int, int, int], per_part: int = 2) -> list[tuple[int, int, int, int]]:
    """Sentences that differ from `parts` in exactly one slot: the hardest negatives a translation pair can have."""
    sizes = (len(SUBJECTS), len(ACTIVITIES), len(PLACES), len(TIMES))
    variants = []
    for step in range(1, per_part + 1):
        for k in range(4):
            other = list(parts)
            other[k] = (parts[k] + step) % sizes[k]
            variants.append(tuple(other))
    return variants


def demo_retrieval(negatives: int = 15) -> list[dict]:
    """Question → answer retrieval in English and Chinese: ``query``, ``positive`` and ``negatives`` (other answers
    in the positive's language, a fixed shuffled order, at most `negatives`)."""
    rng = random.Random(5)
    rows = []
    for i, (q_en, a_en, q_zh, a_zh) in enumerate(FACTS):
        others = [j for j in range(len(FACTS)) if j != i]
        rng.shuffle(others)
        for query, positive, lang in ((q_en, a_en, 1), (q_zh, a_zh, 3)):
            rows.append({"query": query, "positive": positive,
                         "negatives": [FACTS[j][lang] for j in others[:negatives]]})
    return rows


def demo_clr(n: int = 120, negatives: int = 8) -> list[dict]:
    """Cross-lingual retrieval (CLR, paper §3.3): an English sentence retrieves its Chinese translation. Negatives are
    Chinese sentences that differ in one part (subject, activity, place or time), hardest first."""
    rows = []
    for parts in _all_parts(seed=2, n=n):
        rows.append({
            "query": _sentence(parts, "en"),
            "positive": _sentence(parts, "zh"),
            "negatives": [_sentence(v, "zh") for v in _one_part_variants(parts)][:negatives],
        })
    return rows


def demo_classification(n: int = 120, negatives: int = 7, seed: int = 4) -> list[dict]:
    """Activity classification as (``text``, ``positive`` label text, ``negatives`` other label texts), the paper's
    format for classification data; English and Chinese sentences with labels in their own language."""
    rng = random.Random(seed)
    rows = []
    for i, parts in enumerate(_all_parts(seed=seed, n=n)):
        lang = i % 2
        label = parts[1]
        others = [j for j in range(len(ACTIVITY_LABELS)) if j != label]
        rng.shuffle(others)
        rows.append({
            "text": _sentence(parts, ("en", "zh")[lang]),
            "positive": ACTIVITY_LABELS[label][lang],
            "negatives": [ACTIVITY_LABELS[j][lang] for j in others[:negatives]],
        })
    return rows


__all__ = [
    "demo_texts", "demo_instructions", "demo_pairs", "demo_sts", "demo_retrieval", "demo_clr",
    "demo_classification", "ACTIVITY_LABELS",
]
