"""Escaping user text for log lines: nothing invisible or line-breaking gets through."""

from __future__ import annotations

import sys
import unicodedata

from twisted.trial.unittest import SynchronousTestCase

from webchat.logtext import escape_for_log

#: Unicode categories that must never reach a log line raw.
UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


class EscapeTests(SynchronousTestCase):
    def test_every_control_format_and_separator_character_is_escaped(self):
        missed = [
            f"U+{code:04X}"
            for code in range(sys.maxunicode + 1)
            if unicodedata.category(chr(code)) in UNSAFE_CATEGORIES
            and escape_for_log(chr(code)) == chr(code)
        ]
        self.assertEqual(missed, [], f"Unicode {unicodedata.unidata_version}")

    def test_invisible_marks_are_written_as_escapes(self):
        self.assertEqual(
            escape_for_log("a\u200eb\u200fc\u061cd\u200be\ufefff\u2028g\U000e0041"),
            "a\\u200eb\\u200fc\\u061cd\\u200be\\ufefff\\u2028g\\U000e0041",
        )

    def test_visible_text_is_untouched(self):
        text = "héllo wörld — 你好 🌍 <b>x</b> عربي"
        self.assertEqual(escape_for_log(text), text)
