"""A varied natural-text corpus for precision measurements on the real model.

Short and long, prose, code, numbers, chat, and other scripts; the pairs are
fixed (no seed), so a measured bound refers to exactly these texts.
"""

from __future__ import annotations

from pairscore.types import Pair

_PROSE = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century and "
    "spread to continental Europe and North America over the following decades. Steam "
    "engines, mechanised textile mills and new methods of iron production changed how "
    "goods were made, where people lived and how they worked."
)
_CODE = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers."""\n'
    "    out = [0, 1]\n"
    "    while len(out) < n:\n"
    "        out.append(out[-1] + out[-2])\n"
    "    return out[:n]\n"
)
_NUMBERS = "Q3 revenue was $4,218,903.17, up 12.5% from 3,750,114.02; margin 23.08% (2024-09-30)."

NATURAL_PAIRS: list[Pair] = [
    # very short
    Pair("Hello", ""),
    Pair("", "Hello world."),
    Pair("Hi", " there"),
    Pair("2+2=", "4"),
    Pair("Yes", "."),
    # question / answer
    Pair("The capital of France is", " Paris."),
    Pair(
        "Question: what is the boiling point of water at sea level?\nAnswer:",
        " 100 degrees Celsius, or 212 degrees Fahrenheit.",
    ),
    Pair("Translate to French: I like apples.\n", "J'aime les pommes."),
    # prose, medium and long
    Pair(_PROSE[:120], _PROSE[120:]),
    Pair("Summarise in one sentence: " + _PROSE, " Industrialisation transformed production and society."),
    Pair(
        "Once upon a time, in a small village by the sea,",
        " there lived an old fisherman who told stories to anyone who would listen.",
    ),
    # code
    Pair("Write a Python function for Fibonacci numbers.\n", _CODE),
    Pair(_CODE, "print(fibonacci(10))\n"),
    Pair("SELECT name, COUNT(*) FROM orders", " GROUP BY name ORDER BY 2 DESC LIMIT 10;"),
    Pair('<div class="card">', "<h2>Title</h2><p>Body text.</p></div>"),
    # numbers
    Pair("Financial summary: ", _NUMBERS),
    Pair("3.14159 26535 89793", " 23846 26433 83279"),
    Pair("1, 1, 2, 3, 5, 8, 13,", " 21, 34, 55, 89"),
    # chat
    Pair(
        "<|im_start|>user\nWhat is a prime number?<|im_end|>\n<|im_start|>assistant\n",
        "A prime number is a natural number greater than 1 with no divisors other than 1 and itself.",
    ),
    # other scripts
    Pair("Москва — столица России,", " крупнейший город страны."),
    Pair("東京は日本の首都です。", "人口は約千四百万人です。"),
    Pair("北京是中国的首都，", "也是政治和文化中心。"),
    Pair("القاهرة هي عاصمة مصر", " وأكبر مدنها."),
    Pair("नई दिल्ली भारत की राजधानी है", " और एक बड़ा शहर है।"),
    Pair("Ελλάδα: η Αθήνα είναι", " η πρωτεύουσα."),
    Pair("emoji 😀🎉 and café naïve résumé", " — mixed ✓ text."),
]
