"""Redaction runs on RE2 where it agrees with Python's re, and on re everywhere else."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from config.settings import DEFAULT_REDACTIONS
from core.redaction import MASK, _compiled, redact

PYTHON = re.compile("|".join(f"(?:{p})" for p in DEFAULT_REDACTIONS))

# Printable ASCII, weighted towards what the default patterns look for.
_pieces = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    st.sampled_from(
        [
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5500000000000004",
            "sk_live_abcdefgh123",
            "ghp_ABCDEFGH12345678",
            "xoxb-1234-abcdefgh",
            "Bearer abc.def~ghi",
            "BEARER   tokentoken",
            "bob.smith+x@example.co.uk",
            "a@b.cd",
            "@",
            "_",
            " ",
            "1234 5678 90",
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=12).map(" ".join))
def test_re2_masks_exactly_what_re_masks_on_printable_ascii(text: str) -> None:
    assert text.isascii() and text.isprintable()
    assert redact(text * 20, DEFAULT_REDACTIONS) == PYTHON.sub(MASK, text * 20)  # > cache limit: uncached
    assert redact(text, DEFAULT_REDACTIONS) == PYTHON.sub(MASK, text)


def test_the_default_list_compiles_on_re2() -> None:
    compiled = _compiled(DEFAULT_REDACTIONS)
    assert compiled is not None and compiled.fast is not None


def test_other_text_goes_through_re() -> None:
    # Full-width digits are \d to Python (not to RE2); a vertical tab is \s to Python only.
    wide = "card \uff14" + "\uff11" * 15 + " end"
    assert redact(wide, DEFAULT_REDACTIONS) == f"card {MASK} end"
    assert redact("Bearer\x0babcdefghijk", DEFAULT_REDACTIONS) == MASK


def test_a_pattern_re2_cannot_compile_still_redacts() -> None:
    patterns = (r"(?<=id=)\d+",)  # lookbehind: Python's engine only
    compiled = _compiled(patterns)
    assert compiled is not None and compiled.fast is None
    assert redact("user id=12345 here", patterns) == f"user id={MASK} here"
