"""Scoring of any language and of answers that contain ``###``: one normalisation for exact match and ROUGE."""

import random
import unicodedata

import pytest
import torch
from rouge_score import rouge_scorer, tokenizers

from fedbilevel.client.evaluate import generate_answers
from fedbilevel.client.metrics import (
    UnicodeTokenizer,
    answer_text,
    clean_answer,
    exact_match,
    normalise,
    score_answers,
    score_items,
)
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer

ALL_ONE = {"rouge1": 1.0, "rougeL": 1.0, "exact_match": 1.0}
ALL_ZERO = {"rouge1": 0.0, "rougeL": 0.0, "exact_match": 0.0}


# --- 1. Any language, with or without spaces between words ---------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "北京是中国的首都",  # Chinese: no spaces
        "القاهرة عاصمة مصر",  # Arabic
        "Москва — столица России",  # Russian
        "Η Αθήνα είναι η πρωτεύουσα",  # Greek
        "東京は日本の首都です",  # Japanese: kanji and kana, no spaces
        "กรุงเทพฯ เป็นเมืองหลวงของประเทศไทย",  # Thai: no spaces between words
        "नई दिल्ली भारत की राजधानी है",  # Hindi: combining vowel signs inside words
        "서울은 한국의 수도이다",  # Korean: spaces between words
        "ירושלים",  # Hebrew
        "Straße café naïve",  # Latin beyond ASCII
    ],
)
def test_identical_answers_in_any_language_score_one(answer):
    # Before: rouge-score's default tokenizer kept only [a-z0-9], so all but the last gave ROUGE 0.0.
    assert score_answers([answer], [answer]) == ALL_ONE
    assert UnicodeTokenizer().tokenize(answer)


def test_chinese_rouge_counts_characters_hand_computed():
    # Reference 北 京 是 中 国 的 首 都 (8 characters), answer 北 京 是 首 都 (5), all 5 in the reference in order:
    # P = 5/5, R = 5/8, F = 2 P R / (P + R) = (10/8) / (13/8) = 10/13; the LCS is the same 5 characters.
    assert UnicodeTokenizer().tokenize("北京是首都") == ["北", "京", "是", "首", "都"]
    scores = score_answers(["北京是首都"], ["北京是中国的首都"])
    assert scores["rouge1"] == pytest.approx(10 / 13)
    assert scores["rougeL"] == pytest.approx(10 / 13)
    assert 0.0 < scores["rouge1"] < 1.0
    assert scores["exact_match"] == 0.0


def test_chinese_rouge_l_sees_order():
    # Every character matches (ROUGE-1 = 1) but 都首 reversed: the LCS is 北京是 + one of 首/都, 4 of 5.
    scores = score_answers(["北京是都首"], ["北京是首都"])
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(4 / 5)


def test_russian_rouge_counts_words_hand_computed():
    # Tokens москва столица (the dash is punctuation) against москва столица россии: P = 1, R = 2/3, F = 0.8.
    scores = score_answers(["Москва — столица"], ["Москва — столица России"])
    assert scores["rouge1"] == pytest.approx(0.8)
    assert scores["rougeL"] == pytest.approx(0.8)


def test_tokens_by_script():
    tokenize = UnicodeTokenizer().tokenize
    assert tokenize("Η Αθήνα είναι η πρωτεύουσα") == ["η", "αθήνα", "είναι", "η", "πρωτεύουσα"]
    assert tokenize("القاهرة عاصمة مصر") == ["القاهرة", "عاصمة", "مصر"]
    assert tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs and virama stay in their word
    assert tokenize("กรุงเทพ") == ["ก", "รุ", "ง", "เ", "ท", "พ"]  # Thai by character, marks with their letter
    assert tokenize("ひらがなカタカナ") == list("ひらがなカタカナ")
    assert tokenize("我爱Python3!") == ["我", "爱", "python3"]  # mixed: characters, then a word
    assert tokenize("東京、大阪。") == ["東", "京", "大", "阪"]  # CJK punctuation separates and is dropped


def test_rouge_ignores_case_in_every_script_exact_match_does_not():
    for upper, lower in [("МОСКВА", "москва"), ("ΑΘΗΝΑΣ", "αθηνας"), ("STRASSE", "straße")]:
        scores = score_answers([upper], [lower])
        assert (scores["rouge1"], scores["rougeL"], scores["exact_match"]) == (1.0, 1.0, 0.0)


# --- ASCII English scores exactly as before ------------------------------------------------------------

ENGLISH_PAIRS = [
    ("the cat sat", "the cat sat on the mat"),
    ("The Cat sat on the MAT.", "the cat sat on the mat"),
    ("It's 3.14, isn't it?", "it is 3.14"),
    ("snake_case and kebab-case", "snake case, kebab case"),
    ("sun dog cat", "cat dog sun"),
    ("Yes", "yes"),
    ("a  b\n\tc", "c b a"),
    ("running runs ran", "run ran running"),
    ("no overlap here", "something else entirely"),
]


@pytest.mark.parametrize(("prediction", "reference"), ENGLISH_PAIRS)
def test_ascii_english_scores_equal_rouge_score_default(prediction, reference):
    # metrics._scorer() configured rouge-score's default tokenizer with use_stemmer=False before this change.
    default = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False).score(reference, prediction)
    items = score_items([prediction], [reference])
    assert items["rouge1"] == [default["rouge1"].fmeasure]
    assert items["rougeL"] == [default["rougeL"].fmeasure]


def test_ascii_tokens_equal_rouge_score_default():
    default = tokenizers.DefaultTokenizer(use_stemmer=False)
    printable = "".join(chr(code) for code in range(32, 127))
    rng = random.Random(0)
    texts = [printable, printable[::-1]] + [
        "".join(rng.choice(printable + "\t\n") for _ in range(60)) for _ in range(200)
    ]
    for text in texts:
        expected = default.tokenize(text) or [char for char in text.lower() if not char.isspace()]
        assert UnicodeTokenizer().tokenize(text) == expected  # no [a-z0-9] at all: its characters


# --- One normalisation: exact match 1.0 implies ROUGE 1.0, for any text -----------------------------


@pytest.mark.parametrize("answer", ["!!!", "👍", "❤️", "🙂🙃", "...", "+-*/", "👨‍👩‍👧", "´", "\u200b"])
def test_texts_without_letters_score_one_against_themselves(answer):
    # Before: no [a-z0-9] tokens, so ROUGE 0.0 while exact match was 1.0.
    assert score_answers([answer], [answer]) == ALL_ONE


def test_texts_without_letters_are_scored_by_character():
    # Tokens ! ! against ! ! !: P = 2/2, R = 2/3, F = 0.8.
    scores = score_answers(["!!"], ["!!!"])
    assert scores["rouge1"] == pytest.approx(0.8) and scores["exact_match"] == 0.0
    # Different emoji (both with the variation selector U+FE0F, a combining mark) do not match.
    assert score_answers(["❤️"], ["👍\ufe0f"]) == ALL_ZERO


def test_empty_answers():
    assert score_answers([""], [""]) == ALL_ONE  # exact match 1.0, so ROUGE 1.0 (rouge-score alone gives 0.0)
    assert score_answers([" \n"], ["### Instruction:\nx"]) == ALL_ONE  # both empty once cut and normalised
    assert score_answers([""], ["a"]) == ALL_ZERO
    assert score_answers(["a"], [""]) == ALL_ZERO


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("Ｐａｒｉｓ　１２", "Paris 12"),  # full-width letters, digits and ideographic space (NFKC)
        ("cafe\u0301", "café"),  # decomposed vs composed accent
        ("ﬁne", "fine"),  # ligature
        ("ｶﾀｶﾅ", "カタカナ"),  # half-width katakana
        ("  北京\u2028是 首都\t", "北京 是 首都"),  # any whitespace, collapsed
        ("a\u00a0b", "a b"),  # no-break space
    ],
)
def test_normalisation_is_shared_by_exact_match_and_rouge(prediction, reference):
    assert normalise(prediction) == normalise(reference)
    assert exact_match(prediction, reference) == 1.0
    assert score_answers([prediction], [reference]) == ALL_ONE


def _random_text(rng: random.Random) -> str:
    pools = [
        " \t\n\u3000\u00a0\u2028",
        "abcXYZ019_-.,!?'\"#",
        "éüßÅǅﬁ\u0301\u0308\u0327",
        "αβγΣςАБВжщ",
        "אבגعربي",
        "नमस्ते\u094d\u093e",
        "北京是中国的首都ひらがなカタカナｶﾀ",
        "กรุงเทพฯ\u0e31\u0e48",
        "한국어",
        "👍🏽❤\ufe0f\u200d😀",
        "²½Ⅻ①",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 25)))


def _respaced(text: str, rng: random.Random) -> str:
    """The same text with its whitespace runs (and the ends) replaced by other whitespace."""
    spaces = [" ", "  ", "\t", "\n", "\u3000", "\u00a0 "]
    return rng.choice(["", " ", "\n"]) + rng.choice(spaces).join(text.split()) + rng.choice(["", "\t", " \n"])


def test_exact_match_implies_rouge_one_for_random_unicode():
    rng = random.Random(1234)
    for _ in range(1500):
        text = _random_text(rng)
        for variant in (
            text,
            unicodedata.normalize("NFD", text),
            unicodedata.normalize("NFKD", text),
            _respaced(text, rng),
        ):
            assert exact_match(variant, text) == 1.0, (variant, text)
            assert score_answers([variant], [text]) == ALL_ONE, (variant, text)
        assert normalise(normalise(text)) == normalise(text)
        assert UnicodeTokenizer().tokenize(answer_text(text)) or not answer_text(text)


def test_exact_match_stays_case_sensitive():
    assert exact_match("ПАРИЖ", "Париж") == 0.0
    assert exact_match("CAT", "cat") == 0.0


# --- 2. The stop marker: cut only where the template starts a new block ---------------------------


def test_references_with_hashes_written_perfectly_score_one():
    # Before: the generated text was cut at its first "###", so these scored 0.0.
    ingredients = "### Ingredients\n- 2 eggs"
    generated = ingredients + "\n\n### Instruction:\nName a dessert.\n\n### Response:\nCake"
    assert clean_answer(generated) == ingredients
    assert score_answers([generated], [ingredients]) == ALL_ONE
    assert score_answers(["Use C# ### here"], ["Use C# ### here"]) == ALL_ONE


def test_clean_answer_cuts_only_at_template_block_headers():
    assert clean_answer("Paris\n\n### Instruction:\nmore") == "Paris"
    assert clean_answer("Paris\n### Response:\nParis") == "Paris"
    assert clean_answer("Paris\r\n  ### Response: x") == "Paris"  # any line end, indented header
    assert clean_answer("### Instruction:\nx") == ""  # a new block straight away: no answer
    assert clean_answer("Use C# ### here") == "Use C# ### here"
    assert clean_answer("### Ingredients\n- 2 eggs") == "### Ingredients\n- 2 eggs"
    assert clean_answer("### Response") == "### Response"  # not the template's header (no colon)
    assert clean_answer("see ### Instruction: below") == "see ### Instruction: below"  # not at a line start
    assert clean_answer("4\nEND junk", stop_markers=("END",)) == "4"


def test_answers_references_and_baselines_are_treated_alike():
    # A reference that contains a template header is cut like a generated answer, so writing it perfectly
    # still scores 1.0, and the majority-answer baseline (score_answers([answer] * n, references), as in
    # fedbilevel/client/app.py) gets the same treatment as a generated answer.
    reference = "Lyon\n### Response:\nParis"
    assert score_answers([reference], [reference]) == ALL_ONE
    assert score_answers(["Lyon"], [reference]) == ALL_ONE
    references = ["### Ingredients\n- 2 eggs", "Use C# ### here", "Ｐａｒｉｓ"]
    majority = score_answers(["### Ingredients\n- 2 eggs"] * 3, references)
    generated = score_answers(["### Ingredients\n- 2 eggs\n\n### Instruction:\nx"] * 3, references)
    assert majority == generated
    assert majority["exact_match"] == pytest.approx(1 / 3)
    assert score_answers(["Paris"] * 3, references)["exact_match"] == pytest.approx(1 / 3)


class _FixedContinuations(torch.nn.Module):
    """A stand-in causal LM whose ``generate`` appends fixed token rows to the prompts."""

    def __init__(self, rows: list[list[int]]):
        super().__init__()
        self.rows = torch.tensor(rows)
        self.answered = 0

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = self.rows[self.answered : self.answered + len(input_ids)]
        self.answered += len(input_ids)
        return torch.cat([input_ids, rows], dim=1)


def test_generate_answers_cuts_at_eos_and_template_headers_only():
    tokenizer = load_tokenizer(TINY_MODEL)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = [
        [*ids("Use C# ### here"), eos, *ids("junk after the end")],
        ids("### Ingredients\n- 2 eggs\n\n### Instruction:\nmore"),
        [*ids("Hello , world ."), eos],
    ]
    width = max(map(len, rows))
    rows = [row + [pad] * (width - len(row)) for row in rows]
    answers = generate_answers(
        _FixedContinuations(rows),
        tokenizer,
        ["q1", "q2", "q3"],
        batch_size=2,
        max_new_tokens=width,
        bf16_autocast=False,
    )
    assert answers == ["Use C# ### here", "### Ingredients\n- 2 eggs", "Hello , world ."]
    references = ["Use C# ### here", "### Ingredients\n- 2 eggs", "Hello , world ."]
    assert score_items(answers, references) == {name: [1.0, 1.0, 1.0] for name in ALL_ONE}


def test_the_majority_answer_is_counted_as_answers_are_scored():
    from fedbilevel.data.common import most_common_answer
    from fedbilevel.data.types import Example

    outputs = ["yes", "yes ", "ｙｅｓ", "no", "no"]  # three spellings of one scored answer
    examples = [Example("q", out, "t") for out in outputs]
    assert most_common_answer(examples) == ("no", 0.4)  # raw counting: "no" wins
    assert most_common_answer(examples, key=answer_text) == ("yes", 0.6)
