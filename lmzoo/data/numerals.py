"""Chinese numerals both ways: 305 <-> 三百零五, for the built-in bilingual text and the task generator.

The everyday (lower-case) system: digits 零一二三四五六七八九, units 十 百 千 inside a group of four
digits, and 万 (10^4), 亿 (10^8), 万亿 (10^12) between groups. The rules ``to_chinese`` follows:

- a run of zeros inside the number is read as one 零 (1005 一千零五, 10010 一万零一十), trailing
  zeros are silent (1500 一千五百);
- a group below 1000 after a higher group is preceded by 零 (100500 一十万零五百 -> 十万零五百);
- a leading 一十 is said 十 (15 十五, 100000 十万), but not inside (110 一百一十).

``from_chinese`` also reads 两 (2) and 〇 (0), digit-by-digit years (二〇二四 -> 2024) and the spoken
short forms where a last digit right after a unit counts one place lower (三百五 350, 一万五 15,000).
"""

from __future__ import annotations

DIGITS = "零一二三四五六七八九"
_SMALL = {"十": 10, "百": 100, "千": 1000}
_BIG = ["", "万", "亿", "万亿"]
_VALUE = {**{c: i for i, c in enumerate(DIGITS)}, "两": 2, "〇": 0}


def _group(n: int) -> str:
    """0 < n < 10000, with inner zeros read as one 零 and trailing zeros silent."""
    out, zero = "", False
    for unit, name in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // unit % 10
        if d == 0:
            zero = zero or bool(out)
            continue
        if zero:
            out, zero = out + "零", False
        out += DIGITS[d] + name
    return out


def to_chinese(n: int) -> str:
    """An int below 10^16 in Chinese numerals (负 for negatives): 2024 -> 二千零二十四."""
    n = int(n)
    if n < 0:
        return "负" + to_chinese(-n)
    if n == 0:
        return "零"
    if n >= 10 ** 16:
        raise ValueError(f"{n} is too large for Chinese numerals up to 万亿 (below 10^16)")
    groups = []
    while n:
        groups.append(n % 10000)
        n //= 10000
    out, zero = "", False
    for k in range(len(groups) - 1, -1, -1):
        g = groups[k]
        if g == 0:
            zero = zero or bool(out)
            continue
        if out and (zero or g < 1000):
            out += "零"
        out, zero = out + _group(g) + _BIG[k], False
    return out[1:] if out.startswith("一十") else out


def digits_to_chinese(s: str | int) -> str:
    """Digit by digit, as years are read: 2024 -> 二〇二四."""
    return "".join("〇" if c == "0" else DIGITS[int(c)] for c in str(s))


def from_chinese(text: str) -> int:
    """Read a Chinese numeral (the inverse of ``to_chinese``; also 两, 〇 and digit-by-digit strings)."""
    s = text.strip()
    if not s:
        raise ValueError("empty Chinese numeral")
    sign = -1 if s.startswith("负") else 1
    s = s[1:] if sign < 0 else s
    bad = [c for c in s if c not in _VALUE and c not in _SMALL and c not in "万亿"]
    if bad or not s:
        raise ValueError(f"not a Chinese numeral: {text!r} (unexpected {bad[:3]})")
    if all(c in _VALUE for c in s) and len(s) > 1:  # 二〇二四: digit by digit
        return sign * int("".join(str(_VALUE[c]) for c in s))
    total = wan = section = number = 0  # committed at 亿 and above, the 万 part, the group, the digit
    unit, zero = 0, False  # the last unit read, and whether a 零 came after it

    def last_digit() -> int:  # 三百五 is 350 and 一万五 15,000: a digit right after a unit counts one place lower
        return number * (unit // 10) if number and not zero and unit >= 100 else number

    i = 0
    while i < len(s):
        c = s[i]
        if c in _VALUE:
            number = _VALUE[c]
            zero = zero or number == 0
        elif c in _SMALL:
            section += (number or 1) * _SMALL[c]  # 十五: a bare 十 is 一十
            number, unit, zero = 0, _SMALL[c], False
        elif c == "万" and s[i + 1:i + 2] == "亿":  # 万亿 = 10^12
            total += (wan + section + last_digit()) * 10 ** 12
            wan = section = number = 0
            unit, zero = 10 ** 12, False
            i += 1
        elif c == "万":
            wan += (section + last_digit()) * 10 ** 4
            section = number = 0
            unit, zero = 10 ** 4, False
        else:  # 亿: what came since the last 亿 (一万二千亿 = 1.2·10^12 too)
            total += (wan + section + last_digit()) * 10 ** 8
            wan = section = number = 0
            unit, zero = 10 ** 8, False
        i += 1
    return sign * (total + wan + section + last_digit())
