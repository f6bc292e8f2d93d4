"""Code and stack traces in a request: structural evidence that the coder should answer.

Fenced blocks, inline code, trace lines and code-shaped lines count as code; what is left is the prose that the
language detector and the classifier read. Settled by regular expressions because a fence or a traceback is surer
than any word statistics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from core.router.turns import clip

_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_TRACE_MARKERS = (
    "Traceback (most recent call last)", "Exception in thread", "panicked at", "Segmentation fault",
    "core dumped", "undefined reference to", "Cannot find module", "Require stack:", ": command not found",
)
# Line patterns start with a literal newline (the text gets one in front), which the regex engine
# jumps to directly; "^" would be tried at every character.
_TRACE_LINE = re.compile(
    r"""\n[ \t]*(?:Traceback\ \(most\ recent\ call\ last\) | File\ "[^\n]+",\ line\ \d+ | at\ [\w$.<>/\[\]]+\ ?\(
      | at\ \S+:\d+ | npm\ ERR! | Exception\ in\ thread
      | (?:\w+\.)*\w+(?:Error|Exception|Warning|Fault)(?::|\s+in\ thread)
      | error(?:\[E\d+\])?: | fatal: | FATAL: | ERROR: | E\ {2,}\w | \^+[ \t]*$)[^\n]*""",
    re.M | re.X,
)
_FILE_AND_LINE = re.compile(r"\.(?:py|js|jsx|ts|tsx|java|kt|rs|go|c|cc|cpp|h|hpp|cs|rb|php|swift|scala):\d+")
_ERROR_NAME = re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b")
# A whole line is code when it starts with a strong shape (a definition, an import, a statement, a
# shell command). Weak shapes (symbols that also turn up in prose) count only in a line that is not a
# question and holds no letters of a non-Latin script, so a Greek question mark ";" or a formula
# "y = mx + b?" stays prose; they are looked for only when a cheap substring test finds a candidate.
# A markup line is code by an HTML element, a namespaced or custom element, or attributes: prompts for agents mark
# their parts with plain tags ("<task>", "<context>") around prose.
# Commands that are also English verbs ("make it friendlier", "go through my essay", "export my contacts") are code
# only with a command's argument (a flag, path, variable or URL) or in a short line without common English words.
_HTML = (r"html|head|body|div|span|p|a|b|i|em|strong|ul|ol|li|table|thead|tbody|tr|td|th|form|button|select|option"
         r"|textarea|img|br|hr|script|style|link|meta|h[1-6]|nav|footer|article|aside|iframe|canvas|svg|video|audio"
         r"|source|pre|code")  # elements that make a markup line code (as do attributes and namespaced names)
_STRONG_CODE = r"""
        (?:async\ )?(?:def|class)\ \w+\s*[(:] | import\ [\w.]+ | from\ [\w.]+\ import\s
      | \#\s*(?:include|define|pragma|ifn?def)\b
      | (?:public|private|protected|static|final|override|internal)\ [\w<>\[\],\ ]+[({;=]
      | (?:const|let|var|val|auto|int|float|double|char|bool|string|void)\ [\w*&]+\s*[=;(:]
      | function\b | fn\ \w+ | func\ \w+ | package\ [\w.]+ | using\ [\w.]+; | namespace\ \w+ | impl\b
      | struct\ \w+ | enum\ \w+
      | (?:SELECT|INSERT\ INTO|UPDATE|DELETE\ FROM|CREATE\ (?:TABLE|INDEX|VIEW)|ALTER\ TABLE|DROP\ TABLE)\b
      | (?:if|for|while|switch|return|else|elif|try|catch|except|finally|with)\b[^\n]*[:{;)][ \t]*$
      | (?:\$|>>>|\.\.\.)\ \S | \#!/ | [})\]]
      | <(?:! | /?(?:HTML)\b | /?[A-Za-z][\w-]*[-:.][\w.-]* | [A-Za-z][\w-]*\s[^>\n]*=)[^>\n]*>
      | (?:sudo|pip3?|npm|npx|yarn|git|docker|kubectl|helm|cargo|cmake|gcc|g\+\+|clang|javac|python3?|node
         |apt(?:-get)?|systemctl|journalctl|wget|ssh|scp|chmod|chown|mkdir|tar|grep|awk|sed)
        \ [-\w~/.$'"]
      | (?:make|go|export|brew|curl)\ (?:[-~/.$] | [A-Z_]\w*= | https?://
         | (?![^\n]*\b(?:a|an|the|my|me|it|this|that|to|for|and|of|on|in|at|with|through|sure|up|out|some|your|our
                       |sense)\b)[^\n]{1,40}$)
      | (?:echo|cat|ls|cd|rm|cp|mv)\ +(?:-\w|[~/.$]|\S+\s*[|>])
      | [\w.]+\([^()\n]*\)[ \t]*;?[ \t]*$
      | (?![^\n]*\?[ \t]*$)[\w.\[\]'"]+[ \t]*(?:=|\+=|-=|:=)[ \t]*[^=\s]""".replace("HTML", _HTML)
_WEAK_CODE = r"""
        (?![^\n]*\?[ \t]*$)(?![^\n]*[\u0370-\u1FFF\u3040-\u9FFF\uAC00-\uD7AF])[^\n]*?(?=[=!:&|;{}().<$])
        (?:==|!=|=>|::|&&|\|\||[;{}][ \t]*$|\.\w+\(|\(\)|</(?:HTML)>|\$\{|\$[A-Z_]{2,}\b)""".replace("HTML", _HTML)
_CODE_LINE = re.compile(rf"\n[ \t]*(?:{_STRONG_CODE})[^\n]*", re.M | re.X)
_CODE_OR_WEAK_LINE = re.compile(rf"\n[ \t]*(?:{_STRONG_CODE}|{_WEAK_CODE})[^\n]*", re.M | re.X)
_WEAK_HINTS = ("==", "!=", "=>", "::", "&&", "||", "()", "</", "$", ";\n", "{\n", "}\n")
_METHOD_CALL = re.compile(r"\.\w+\(")
CODE_SHARE = 0.5  # this share of code makes a turn code (and a non-English one "mostly code")
_CODE_SAMPLE_CHARS = 512


def _nonspace(text: str) -> int:
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t")


@dataclass(frozen=True)
class CodeEvidence:
    """How much of a turn is code, whether a block or trace settles it, and the prose left over."""

    share: float  # code characters / all non-space characters
    structural: str | None  # "code block", "stack trace", "code" or None
    prose: str


def code_evidence(text: str) -> CodeEvidence:
    """Fenced blocks, inline code, trace lines and code-shaped lines are code; the rest is prose.

    Substring markers are looked for in the whole text; the line patterns, which cost more, read a
    head-and-tail sample, enough to measure the share of code.
    """
    fenced = "```" in text
    traced = any(map(text.__contains__, _TRACE_MARKERS)) or bool(_FILE_AND_LINE.search(text)) or (
        ("Error" in text or "Exception" in text) and bool(_ERROR_NAME.search(text)))
    sample = "\n" + clip(text, _CODE_SAMPLE_CHARS)
    total = _nonspace(sample)
    prose = _FENCE.sub("\n", sample) if "```" in sample else sample
    prose, trace_lines = _TRACE_LINE.subn("", prose)
    weak = (any(map(prose.__contains__, _WEAK_HINTS)) or prose.rstrip().endswith((";", "{", "}"))
            or ("(" in prose and bool(_METHOD_CALL.search(prose))))
    prose = (_CODE_OR_WEAK_LINE if weak else _CODE_LINE).sub("", prose)
    if "`" in prose:
        prose = _INLINE_CODE.sub(" ", prose)
    share = 1.0 - _nonspace(prose) / total if total else 0.0
    if fenced:
        structural = "code block"
    elif traced or trace_lines:
        structural = "stack trace"
    elif share >= CODE_SHARE:
        structural = "code"
    else:
        structural = None
    return CodeEvidence(share, structural, prose)
