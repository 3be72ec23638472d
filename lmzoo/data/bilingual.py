"""A bilingual English/Chinese text generator written for lmzoo: templated sentences with numbers,
dates, times, Chinese numerals, arithmetic and comparisons, each also as a translation pair.

Nothing here is copied from anywhere: the word lists and templates are this file's own. Every fact a
sentence states is true (sums, weekdays of dates, which number is larger, how a number is written in
Chinese), so a small model can learn real regularities from it within minutes: number words, the
weekday arithmetic of a calendar, and how English maps to Chinese. Seeded: ``bilingual_documents(n,
seed)`` returns the same documents on every machine.
"""

from __future__ import annotations

import datetime as dt
import random

from lmzoo.data.numerals import digits_to_chinese, to_chinese

NAMES = [("Alice", "爱丽丝"), ("Bob", "鲍勃"), ("Lily", "莉莉"), ("Tom", "汤姆"), ("Mary", "玛丽"),
         ("Jack", "杰克"), ("Anna", "安娜"), ("David", "大卫"), ("Xiaoming", "小明"), ("Xiaohong", "小红")]
# (singular, plural, Chinese, measure word)
THINGS = [("apple", "apples", "苹果", "个"), ("book", "books", "书", "本"), ("pencil", "pencils", "铅笔", "支"),
          ("cup", "cups", "杯子", "个"), ("flower", "flowers", "花", "朵"), ("ticket", "tickets", "票", "张"),
          ("egg", "eggs", "鸡蛋", "个"), ("chair", "chairs", "椅子", "把"), ("shirt", "shirts", "衬衫", "件"),
          ("map", "maps", "地图", "张")]
PLACES = [("market", "市场"), ("school", "学校"), ("library", "图书馆"), ("park", "公园"), ("station", "车站"),
          ("shop", "商店"), ("museum", "博物馆"), ("hospital", "医院")]
CITIES = [("Beijing", "北京"), ("Shanghai", "上海"), ("London", "伦敦"), ("Paris", "巴黎"), ("Tokyo", "东京"),
          ("Sydney", "悉尼"), ("Cairo", "开罗"), ("Berlin", "柏林")]
WEATHER = [("sunny", "晴天"), ("rainy", "下雨"), ("cloudy", "多云"), ("windy", "刮风"), ("snowy", "下雪")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("white", "白色"), ("black", "黑色"),
          ("yellow", "黄色")]
ANIMALS = [("cat", "猫", "只"), ("dog", "狗", "只"), ("bird", "鸟", "只"), ("horse", "马", "匹"),
           ("fish", "鱼", "条"), ("rabbit", "兔子", "只")]
ACTIONS = [("is sleeping", "在睡觉"), ("is running", "在跑"), ("is eating", "在吃东西"), ("is playing", "在玩")]
WEEKDAYS = [("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
            ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def english_number(n: int) -> str:
    """0..9999 in words: 305 -> three hundred five, 42 -> forty-two."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + english_number(n % 100) if n % 100 else "")
    return english_number(n // 1000) + " thousand" + (" " + english_number(n % 1000) if n % 1000 else "")


def _date(r: random.Random) -> dt.date:
    return dt.date(1990, 1, 1) + dt.timedelta(days=r.randrange(365 * 45))


def zh_date(d: dt.date) -> str:
    return f"{digits_to_chinese(d.year)}年{to_chinese(d.month)}月{to_chinese(d.day)}日"


# Each template draws its values and returns (English, Chinese): the same statement in both languages.
def t_shopping(r):
    (n, zn), (s, p, zs, m), (pl, zpl) = r.choice(NAMES), r.choice(THINGS), r.choice(PLACES)
    k = r.randint(1, 30)
    return f"{n} bought {english_number(k)} {p if k > 1 else s} at the {pl}.", f"{zn}在{zpl}买了{to_chinese(k)}{m}{zs}。"


def t_date(r):
    d = _date(r)
    w, zw = WEEKDAYS[d.weekday()]
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year} was a {w}.", f"{zh_date(d)}是{zw}。"


def t_sum(r):
    a, b = r.randint(0, 99), r.randint(0, 99)
    return f"{a} plus {b} equals {a + b}.", f"{to_chinese(a)}加{to_chinese(b)}等于{to_chinese(a + b)}。"


def t_difference(r):
    a, b = sorted((r.randint(0, 99), r.randint(0, 99)), reverse=True)
    return f"{a} minus {b} equals {a - b}.", f"{to_chinese(a)}减{to_chinese(b)}等于{to_chinese(a - b)}。"


def t_product(r):
    a, b = r.randint(1, 12), r.randint(1, 12)
    return f"{a} times {b} is {a * b}.", f"{to_chinese(a)}乘以{to_chinese(b)}是{to_chinese(a * b)}。"


def t_numeral(r):
    n = r.choice([r.randint(0, 99), r.randint(100, 9999), r.randint(10000, 10 ** 8)])
    return f"The number {n} is written {to_chinese(n)} in Chinese.", f"数字{n}写作{to_chinese(n)}。"


def t_words(r):
    n = r.randint(0, 9999)
    return f"{n} is read as {english_number(n)}.", f"{n}读作{to_chinese(n)}。"


def t_compare(r):
    a, b = r.sample(range(1000), 2)
    big, small = max(a, b), min(a, b)
    return f"{big} is larger than {small}.", f"{to_chinese(big)}比{to_chinese(small)}大。"


def t_count(r):
    a = r.randint(1, 90)
    seq = range(a, a + 5)
    return ("Counting from " + english_number(a) + ": " + ", ".join(english_number(i) for i in seq) + ".",
            f"从{to_chinese(a)}数起：" + "、".join(to_chinese(i) for i in seq) + "。")


def t_time(r):
    (pl, zpl), h, mi = r.choice(PLACES[3:5]), r.randint(1, 12), r.choice([0, 5, 10, 15, 20, 30, 45, 50])
    return (f"The bus to the {pl} leaves at {h}:{mi:02d}.",
            f"去{zpl}的公共汽车{to_chinese(h)}点{to_chinese(mi) + '分' if mi else '整'}出发。")


def t_weather(r):
    (c, zc), (w, zw), t = r.choice(CITIES), r.choice(WEATHER), r.randint(-10, 38)
    return f"It is {w} in {c} today, {t} degrees.", f"今天{zc}{zw}，{to_chinese(t)}度。"


def t_animal(r):
    (col, zcol), (a, za, m), (act, zact) = r.choice(COLORS), r.choice(ANIMALS), r.choice(ACTIONS)
    return f"The {col} {a} {act}.", f"那{m}{zcol}的{za}{zact}。"


def t_next_day(r):
    d = _date(r)
    e = d + dt.timedelta(days=1)
    return (f"The day after {MONTHS[d.month - 1]} {d.day}, {d.year} is {MONTHS[e.month - 1]} {e.day}, {e.year}.",
            f"{zh_date(d)}的后一天是{zh_date(e)}。")


TEMPLATES = [t_shopping, t_date, t_sum, t_difference, t_product, t_numeral, t_words, t_compare, t_count, t_time,
             t_weather, t_animal, t_next_day]
STYLES = ("english", "chinese", "pairs")  # a document is all English, all Chinese, or translation pairs


def bilingual_document(r: random.Random, n_sentences: int = 12) -> str:
    style = r.choice(STYLES)
    pairs = [r.choice(TEMPLATES)(r) for _ in range(n_sentences)]
    if style == "english":
        return " ".join(en for en, _ in pairs)
    if style == "chinese":
        return "".join(zh for _, zh in pairs)
    return "\n".join(f"English: {en}\n中文：{zh}" for en, zh in pairs)


def bilingual_documents(n: int, seed: int = 0, n_sentences: int = 12) -> list[str]:
    """``n`` documents of ``n_sentences`` sentences each; the same list for the same seed."""
    r = random.Random(seed)
    return [bilingual_document(r, n_sentences) for _ in range(n)]
