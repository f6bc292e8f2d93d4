"""TF-IDF semantic router: picks the expert for a request that names no model.

Structural signals come first, because they are cheaper and surer than text similarity: an image
needs the vision expert, code or a stack trace needs the coder, non-English text or a translation
request needs the multilingual expert. Everything else is decided by cosine similarity between the
request and each expert's TF-IDF profile (domain, description, keywords and example prompts from the
config), over word and character n-grams so that short prompts, code and any script still match.

The vectorizers are fitted once by scikit-learn. A request is then scored in numpy with the fitted
vocabulary and idf (n-grams are hashed and looked up, never built as Python strings), because
sklearn's ``transform`` costs more per call than the routing budget of a fraction of a millisecond.
A ``Router`` is never mutated after ``__init__``, so one instance serves any number of concurrent
requests.
"""
from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from .config import AppConfig, ExpertConfig
from .protocol import ChatMessage

# ---------------------------------------------------------------------------------------------
# Code and stack-trace detection
# ---------------------------------------------------------------------------------------------

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
_STRONG_CODE = r"""
        (?:async\ )?(?:def|class)\ \w+\s*[(:] | import\ [\w.]+ | from\ [\w.]+\ import\s
      | \#\s*(?:include|define|pragma|ifn?def)\b
      | (?:public|private|protected|static|final|override|internal)\ [\w<>\[\],\ ]+[({;=]
      | (?:const|let|var|val|auto|int|float|double|char|bool|string|void)\ [\w*&]+\s*[=;(:]
      | function\b | fn\ \w+ | func\ \w+ | package\ [\w.]+ | using\ [\w.]+; | namespace\ \w+ | impl\b
      | struct\ \w+ | enum\ \w+
      | (?:SELECT|INSERT\ INTO|UPDATE|DELETE\ FROM|CREATE\ (?:TABLE|INDEX|VIEW)|ALTER\ TABLE|DROP\ TABLE)\b
      | (?:if|for|while|switch|return|else|elif|try|catch|except|finally|with)\b[^\n]*[:{;)][ \t]*$
      | (?:\$|>>>|\.\.\.)\ \S | \#!/ | [})\]] | <[/!]?[A-Za-z][\w-]*(?:\s[^>\n]*)?/?>
      | (?:sudo|pip3?|npm|npx|yarn|git|docker|kubectl|helm|cargo|go|make|cmake|gcc|g\+\+|clang|javac|python3?|node
         |apt(?:-get)?|brew|systemctl|journalctl|curl|wget|ssh|scp|chmod|chown|mkdir|tar|grep|awk|sed|export)
        \ [-\w~/.$'"]
      | (?:echo|cat|ls|cd|rm|cp|mv)\ +(?:-\w|[~/.$]|\S+\s*[|>])
      | [\w.]+\([^()\n]*\)[ \t]*;?[ \t]*$
      | (?![^\n]*\?[ \t]*$)[\w.\[\]'"]+[ \t]*(?:=|\+=|-=|:=)[ \t]*[^=\s]"""
_WEAK_CODE = r"""
        (?![^\n]*\?[ \t]*$)(?![^\n]*[\u0370-\u1FFF\u3040-\u9FFF\uAC00-\uD7AF])[^\n]*?(?=[=!:&|;{}().<$])
        (?:==|!=|=>|::|&&|\|\||[;{}][ \t]*$|\.\w+\(|\(\)|</\w|\$\{|\$[A-Z_]{2,}\b)"""
_CODE_LINE = re.compile(rf"\n[ \t]*(?:{_STRONG_CODE})[^\n]*", re.M | re.X)
_CODE_OR_WEAK_LINE = re.compile(rf"\n[ \t]*(?:{_STRONG_CODE}|{_WEAK_CODE})[^\n]*", re.M | re.X)
_WEAK_HINTS = ("==", "!=", "=>", "::", "&&", "||", "()", "</", "$", ";\n", "{\n", "}\n")
_METHOD_CALL = re.compile(r"\.\w+\(")
_CODE_SHARE = 0.5  # this share of code makes a turn code (and a non-English one "mostly code")
_CODE_SAMPLE_CHARS = 512


def _nonspace(text: str) -> int:
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t")


@dataclass(frozen=True)
class _CodeEvidence:
    """How much of a turn is code, whether a block or trace settles it, and the prose left over."""

    share: float  # code characters / all non-space characters
    structural: str | None  # "code block", "stack trace", "code" or None
    prose: str


def _code_evidence(text: str) -> _CodeEvidence:
    """Fenced blocks, inline code, trace lines and code-shaped lines are code; the rest is prose.

    Substring markers are looked for in the whole text; the line patterns, which cost more, read a
    head-and-tail sample, enough to measure the share of code.
    """
    fenced = "```" in text
    traced = any(map(text.__contains__, _TRACE_MARKERS)) or bool(_FILE_AND_LINE.search(text)) or (
        ("Error" in text or "Exception" in text) and bool(_ERROR_NAME.search(text)))
    sample = "\n" + _clip(text, _CODE_SAMPLE_CHARS)
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
    elif share >= _CODE_SHARE:
        structural = "code"
    else:
        structural = None
    return _CodeEvidence(share, structural, prose)


# ---------------------------------------------------------------------------------------------
# Words, shared by language detection, translation requests and the word n-grams
# ---------------------------------------------------------------------------------------------

# Word separators: whitespace, punctuation and symbols, except "_", "+" and "#" (snake_case, c++, c#).
_SEPARATORS = {
    code: " "
    for code in (*range(0x3100), *range(0xFE30, 0xFF66))
    if chr(code).isspace() or (unicodedata.category(chr(code))[0] in "PS" and chr(code) not in "_+#")
}
_SEPARATOR_RUN = re.compile("[" + "".join(re.escape(chr(code)) for code in sorted(_SEPARATORS)) + "]+")
_IS_SEPARATOR = np.zeros(0x110000, dtype=bool)
_IS_SEPARATOR[list(_SEPARATORS)] = True


def _tokens(text: str) -> list[str]:
    """Split at separators (``translate`` is the fastest way for ASCII, the regex for the rest)."""
    return text.translate(_SEPARATORS).split() if text.isascii() else _SEPARATOR_RUN.split(text)


# ---------------------------------------------------------------------------------------------
# Language detection: script first, then function words for Latin-script languages
# ---------------------------------------------------------------------------------------------

# Letters by script, as (first, last, script) code point ranges; "latin" is what English is written in.
_SCRIPT_RANGES = (  # sorted and disjoint
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x0370, 0x03FF, "el"),
    (0x0400, 0x04FF, "ru"), (0x0530, 0x058F, "hy"), (0x0590, 0x05FF, "he"), (0x0600, 0x06FF, "ar"),
    (0x0750, 0x077F, "ar"), (0x0900, 0x097F, "hi"), (0x0980, 0x09FF, "bn"), (0x0B80, 0x0BFF, "ta"),
    (0x0C00, 0x0C7F, "te"), (0x0E00, 0x0E7F, "th"), (0x10A0, 0x10FF, "ka"), (0x1100, 0x11FF, "ko"),
    (0x1200, 0x137F, "am"), (0x1E00, 0x1EFF, "latin"), (0x1F00, 0x1FFF, "el"), (0x3040, 0x30FF, "ja"),
    (0x3400, 0x9FFF, "zh"), (0xAC00, 0xD7AF, "ko"), (0xF900, 0xFAFF, "zh"),
)
_SCRIPT_NAMES = tuple(dict.fromkeys(name for _, _, name in _SCRIPT_RANGES))
_SCRIPT_EDGES = np.array([edge for first, last, _ in _SCRIPT_RANGES for edge in (first, last + 1)], dtype=np.uint32)
# bin i of searchsorted(_SCRIPT_EDGES, code, "right") is a range when i is odd, a gap (-> last slot) when even
_SCRIPT_OF_BIN = np.array(
    [len(_SCRIPT_NAMES)] + [x for _, _, name in _SCRIPT_RANGES for x in (_SCRIPT_NAMES.index(name), len(_SCRIPT_NAMES))]
)
# A CJK or Hangul character carries about as much as a word: it counts three times.
_SCRIPT_WEIGHTS = np.array([3.0 if name in ("zh", "ja", "ko") else 1.0 for name in _SCRIPT_NAMES])
_SIBLING_MARKERS = {  # letters that only a sibling language uses
    "ru": ("uk", frozenset("іїєґІЇЄҐ")),
    "ar": ("fa", frozenset("پچژگکی")),
}
_SCRIPT_SHARE = 0.3  # share of (weighted) letters in a non-Latin script that makes a text non-English


def _script(text: str) -> str:
    """The dominant non-Latin script's language, or "en" when Latin letters dominate."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    bins = _SCRIPT_OF_BIN[_SCRIPT_EDGES.searchsorted(codes, side="right")]
    counts = np.bincount(bins, minlength=len(_SCRIPT_NAMES) + 1)[:-1] * _SCRIPT_WEIGHTS
    latin, other = counts[0], counts[1:].sum()
    if not other or other < _SCRIPT_SHARE * (other + latin):
        return "en"
    counts[0] = 0.0
    cjk = {name: counts[_SCRIPT_NAMES.index(name)] for name in ("zh", "ja", "ko")}
    if sum(cjk.values()) >= counts.max():  # kana make it Japanese, hangul Korean, han alone Chinese
        return "ja" if cjk["ja"] else "ko" if cjk["ko"] >= cjk["zh"] else "zh"
    language = _SCRIPT_NAMES[int(counts.argmax())]
    sibling, markers = _SIBLING_MARKERS.get(language, ("", frozenset()))
    return sibling if markers and not markers.isdisjoint(text) else language


_ENGLISH = frozenset("""
the an and or but if then else of to in on at by for with from about into over after before between
under through during without within than as so too very just also only not no yes is are was were be
been being am do does did done doing have has had having can could will would should shall may might
must it its this that these those there here what which who whom whose when where why how me my mine
you your yours he him his she her hers we us our ours they them their theirs some any all each every
more most much many other another such own same few both either neither up down out off again once
please thanks thank hello hi hey make get give tell write explain show find need want like know use
using used work works way best good new one two first time people thing things let don doesn didn isn
aren won ll ve re
""".split())
# English words that are also a foreign function word below: never evidence of another language.
_ENGLISH_HOMOGRAPHS = frozenset("""
die den son sa plus par tag gut lo con ha chi dove non fare come sono mia pro men till care pot van
met ten ale mam hoe dank ben dan sam ali kim sen biz var ama ai pe ea din dig sig mig min hans tack
med av et deg meg ei tai ki ya pia kama lang hindi ko mo sino po oo ang rin bom boa os dos nas com em
tem pelo per qui puc
""".split())
# Frequent function words, greetings and everyday words per language; earlier lists win ties.
_STOP_WORDS: dict[str, str] = {
    "es": """el la los las un una unos unas del al en con por para sin sobre entre es son está están
        estoy estás ser estar hay fue era como cómo qué que cuál cuáles cuándo dónde donde quién quiénes
        porque muy más mi mis tu tus su sus yo tú él ella ellos ellas nosotros usted ustedes lo le les se
        te nos este esta esto ese esa eso también puedo puedes puede quiero hola gracias buenos buenas
        días favor bien mejor hacer tengo tiene cuánto cuántos cuántas ayuda ayúdame explica explícame
        escribe dime sí ahora hoy mañana pero todo todos nada algo cosa hasta desde cual siempre nunca
        año años día tiempo mundo vida casa trabajo persona gente ciudad país agua""",
    "fr": """le la les un une des du de en et ou mais dit est sont être avoir ai avez suis es je tu il elle nous
        vous ils elles ce cette ces cet qui que quoi quel quelle quels quelles comment pourquoi où quand
        combien dans sur avec pour sans chez pas ne très bien aussi mon ma mes ton ta tes son sa ses
        notre votre leur leurs bonjour bonsoir merci salut oui peux pouvez peut faire fait qu voudrais
        veux moi toi lui ça cela au aux été jour temps monde vie maison travail ville pays eau beaucoup""",
    "de": """der das dem ein eine einen einem einer und oder aber ist sind bist sein haben habe ich du er
        sie es wir ihr mich mir dich dir uns nicht kein keine mit von zu auf für aus bei nach über unter
        wie warum wo wann wer welche welcher welches kann kannst können muss soll wird werden auch noch
        schon sehr nur hallo danke bitte guten morgen ja nein dass diese dieser dieses mein meine dein
        deine ihre gibt erkläre erklär schreibe funktioniert viel viele heute jahr zeit welt leben haus
        arbeit stadt land wasser gerne""",
    "it": """il la gli le un uno una di del della dei delle dello degli al alla nel nella con su da tra
        fra è sei essere ho hai abbiamo che cosa quando perché quale quali quanto quanti più molto
        anche mio tuo tua suo sua questo questa quello quella ciao grazie buongiorno buonasera puoi
        posso mi ti ci si vi sì qual sta stai anno giorno tempo mondo vita casa lavoro città paese
        acqua migliore""",
    "pt": """os um uma uns umas ou mas de da dos das em no na nos nas com por para sem sobre é são está
        estão estou ser ter tem que quem qual quais como onde quando porque não mais muito também meu
        minha seu sua você vocês eu ele ela nós eles elas isso isto esse essa este esta olá obrigado
        obrigada bom boa dia pode posso fazer ao aos pelo pela já melhor maneira fica ano tempo mundo
        vida casa trabalho cidade país água""",
    "nl": """de het een en maar zijn ben bent heb hebt heeft ik jij je hij zij ze wij jullie niet geen
        met van voor op aan bij uit naar hoe wat waarom waar wanneer wie welke kan kun kunt moet wil zal
        ook nog er dit dat deze die mijn jouw hallo dank bedankt goed graag alsjeblieft hoeveel vandaag
        wordt worden jaar tijd wereld leven huis werk stad land water""",
    "pl": """na nie się jest są to jak co czy że ale lub albo dla od po przez jestem mam ma mój moja
        twój ten ta tego który która które gdzie kiedy dlaczego ile proszę dziękuję dzień dobry cześć
        mogę możesz być bardzo jaki jaka jakie mi mnie ci tak rok czas świat życie dom praca miasto""",
    "cs": """je jsou na se si to že co jak proč kde kdy kdo který která které ale nebo pro od do mi mě
        mne já ty ona vy oni jsem jsi být mám máš může můžeš prosím děkuji dobrý den ahoj velmi také
        není jaký jaká rok čas svět život dům práce město""",
    "sk": """je sú na sa to že čo ako prečo kde kedy kto ktorý ale alebo pre od do ja ty ona vy som si
        môžem môžeš prosím ďakujem dobrý deň ahoj veľmi aj nie""",
    "hr": """je su na se da za od do ne što šta kako zašto gdje gde kada tko ko koji koja koje ja ti
        ona mi vi oni moj tvoj hvala molim dobar dan zdravo bok ali ili biti sam si smo ste li mogu
        možeš vrlo""",
    "tr": """bir ve bu şu ne nasıl neden niçin nerede kim hangi mi mı mu mü için ile gibi daha çok en
        değil var yok ben sen biz siz onlar benim senin merhaba teşekkür ederim lütfen evet hayır olan
        olarak kadar ama veya da de ki bana sana nedir şehir yıl zaman dünya hayat ev iş bugün yarın şimdi
        güzel istiyorum yapabilirim nereye""",
    "ro": """și sau dar este sunt al ale ai un unei unui în pe la cu de din pentru că ce cum unde când
        cine care nu mai foarte eu tu el ea noi voi ei ele meu mea tău ta acest această aceasta bună
        mulțumesc vă rog poți pot să îmi mi ne cel cea""",
    "vi": """là của và có không tôi bạn được một những các cho với này đó trong người như thế nào gì
        làm sao ở đâu khi để đã sẽ đang rất cũng xin chào cảm ơn nhiều hơn""",
    "id": """yang dan di ke dari ini itu dengan untuk pada adalah tidak bukan saya aku kamu anda dia
        kami kita mereka apa siapa mengapa kenapa bagaimana kapan berapa bisa bisakah dapat akan sudah
        belum juga sangat lebih terima kasih selamat tolong ada ibu kota cara tahun hari orang rumah""",
    "sv": """och att det som en ett är för på med av till den de har inte jag du han hon vi ni mig dig
        sig om men eller vad hur varför när vem vilken kan ska skulle också mycket hej tack min din
        hans hennes vår huvudstaden""",
    "no": """og jeg er det ikke på med en et til av som hva hvordan hvorfor hvor når hvem kan vil skal
        også mye meget hei takk har være deg meg""",
    "da": """og jeg er det ikke på med en et til af som hvad hvordan hvorfor hvor når hvem kan vil skal
        også meget hej tak har være dig mig""",
    "fi": """ja on ei se että mitä miten miksi missä milloin kuka mikä minä sinä hän olen olet ovat oli
        kiitos hei hyvä voi voit voisitko myös kanssa tämä tuo kun jos mutta tai""",
    "hu": """az és egy hogy nem van vagy mit hogyan miért hol mikor ki melyik én te ők köszönöm szia jó
        kérem lehet tudsz nagyon ez meg már csak még""",
    "ca": """els les una però del amb per que què com quan qui és són està sóc més molt també meu teu
        seu aquest aquesta hola gràcies pot puc bon dia estàs""",
    "sw": """na ya wa za kwa ni la katika hii hiyo yangu yako nini vipi gani wapi lini nani mimi wewe
        yeye sisi habari asante tafadhali jambo ndiyo hapana kuna sana pia kama lakini au""",
    "tl": """ang ng mga sa na ay at ko mo niya ako ikaw siya kami tayo sila ano paano bakit saan kailan
        sino po salamat hindi oo ito iyan kumusta magandang para lang din rin""",
}
# Letters English words essentially never use: one more piece of evidence for a language that has them.
_DISTINCTIVE_LOWER = {
    "es": "ñ¿¡", "fr": "çœèêëîïûù", "de": "ßäöü", "pt": "ãõç", "it": "àèìòù", "pl": "ąćęłńśźż",
    "cs": "ěčřůý", "sk": "ľĺŕôä", "hr": "čćđ", "tr": "ğışçöü", "ro": "ăâîșțşţ",
    "vi": "ạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹđơư",
    "sv": "åäö", "no": "åøæ", "da": "åøæ", "fi": "äö", "hu": "őűáéíóöü", "ca": "çàèò",
}
_DISTINCTIVE = {  # with their capitals, unless a capital is plain ASCII or two letters (ı -> I, ß -> SS)
    language: letters + "".join(c.upper() for c in letters if len(c.upper()) == 1 and not c.upper().isascii()
                                and c.upper() != c)
    for language, letters in _DISTINCTIVE_LOWER.items()
}
_RANK = {language: rank for rank, language in enumerate(_STOP_WORDS)}


def _index_function_words() -> dict[str, tuple[str, ...]]:
    """Each foreign function word with the languages that use it; English look-alikes left out."""
    index: dict[str, tuple[str, ...]] = {}
    for language, words in _STOP_WORDS.items():
        for word in sorted(set(words.split()) - _ENGLISH - _ENGLISH_HOMOGRAPHS):
            if len(word) > 1:
                index[word] = index.get(word, ()) + (language,)
    return index


_LANGUAGES_OF_WORD = _index_function_words()
_FOREIGN_WORDS = frozenset(_LANGUAGES_OF_WORD)


def _words(text: str) -> frozenset[str]:
    """The distinct lower-case words of a text; a foreign-looking one written only as an acronym
    (OS, EU, DOS) is left out."""
    raw = set(_tokens(text))
    words = frozenset(map(str.lower, raw))
    acronyms = {w for w in words & _FOREIGN_WORDS if w not in raw and w.upper() in raw and w.capitalize() not in raw}
    return words - acronyms if acronyms else words


def detect_language(text: str, words: frozenset[str] | None = None) -> str:
    """An ISO 639-1 guess, "en" unless the text shows clear evidence of another language.

    A non-Latin script decides on its own (Cyrillic, CJK or Arabic text is not English). Latin-script
    text needs more distinct function words of one language than of English, or several foreign ones
    and no English at all; distinctive letters count as one more word.
    """
    if not text.isascii() and (script := _script(text)) != "en":
        return script
    words = _words(text) if words is None else words
    foreign = words & _FOREIGN_WORDS
    if not foreign:
        return "en"
    english = len(words & _ENGLISH)
    hits: dict[str, int] = {}
    for word in foreign:
        for language in _LANGUAGES_OF_WORD[word]:
            hits[language] = hits.get(language, 0) + 1
    if not text.isascii():
        for language in hits:
            if any(map(text.__contains__, _DISTINCTIVE.get(language, ""))):
                hits[language] += 1
    language, score = min(hits.items(), key=lambda item: (-item[1], _RANK[item[0]]))
    if english == 0 and (len(foreign) >= 2 or len(words) <= 3):
        return language
    return language if score >= 2 and score > english else "en"


# ---------------------------------------------------------------------------------------------
# Explicit translation and language requests written in English
# ---------------------------------------------------------------------------------------------

_LANGUAGE_NAMES = frozenset("""
spanish french german italian portuguese dutch polish russian ukrainian chinese mandarin cantonese
japanese korean arabic persian farsi hindi urdu bengali punjabi tamil turkish vietnamese indonesian malay
thai greek hebrew czech slovak romanian hungarian swedish norwegian danish finnish catalan swahili tagalog
filipino latin esperanto croatian serbian bulgarian
""".split())
_TRANSLATE_WORDS = frozenset("""
translate translates translated translating translation translations translator traducir traduce
traduire traduis tradurre traduci traduzir traduza übersetzen übersetze übersetzung
""".split())
_CONJUGATE_WORDS = frozenset({"conjugate", "conjugation", "conjugations", "conjugating"})
_LEARNING_WORDS = frozenset("""
learn learning practice practise study studying speak speaking fluent fluently conversation vocabulary
grammar pronunciation pronounce accent lesson lessons tutor alphabet
""".split())
_MEANING_WORDS = frozenset("say mean means meaning called written spell spelled pronounce pronounced".split())
_PROGRAMMING_WORDS = frozenset("""
python javascript typescript java kotlin rust golang ruby php swift scala haskell perl lua bash shell sql
code function class script program snippet json yaml xml html css
""".split())
_TRANSLATION_OBJECTS = frozenset("""
this these following sentence phrase word words text paragraph letter message email song lyrics poem menu sign
""".split())
_QUOTES = "\"'‘’“”«»"
_NAMES = "|".join(sorted(_LANGUAGE_NAMES))
_HOW_TO_SAY = re.compile(r"\bhow (?:do|would|can|should) (?:you|i|we|one) (?:say|write|pronounce)\b")
_IN_LANGUAGE = re.compile(
    rf"\bin(?:to)? (?:{_NAMES})\b(?=\s*(?:[.,;:!?)\"'\n]|$|about\b|for\b|please\b|so\b|that\b|using\b))"
)
_LANGUAGE_NOUN = re.compile(
    rf"\b(?:{_NAMES}) (?:word|phrase|term|expression|translation|equivalent|grammar|verb|noun|for)\b"
)
_MEANING_IN = re.compile(rf"\b(?:{'|'.join(_MEANING_WORDS)})\b[^.?!\n]{{0,60}}\bin (?:english|{_NAMES})\b")


def is_translation_request(text: str, words: frozenset[str] | None = None) -> bool:
    """An English request to translate, or to answer in or about another language (not code to code).

    "translate" alone is not enough ("NAT translates addresses"): it needs a language name, a quoted
    phrase or a text to work on. Word sets are checked first, so most prompts cost no regex at all.
    """
    words = _words(text) if words is None else words
    names = words & _LANGUAGE_NAMES
    if words & _TRANSLATE_WORDS:
        lowered = text.lower()
        programming = bool(words & _PROGRAMMING_WORDS) or "c++" in lowered or "c#" in lowered
        if programming and not names:
            return False
        if names or words & _TRANSLATION_OBJECTS or any(quote in text for quote in _QUOTES):
            return True
    if words & _CONJUGATE_WORDS or (names and words & _LEARNING_WORDS):
        return True
    if not names and "english" not in words and not (words & {"say", "pronounce"}):
        return False
    lowered = text.lower()
    return bool(
        _HOW_TO_SAY.search(lowered)
        or "what language is" in lowered
        or (names and (_IN_LANGUAGE.search(lowered) or _LANGUAGE_NOUN.search(lowered)))
        or (words & _MEANING_WORDS and _MEANING_IN.search(lowered))
    )


# ---------------------------------------------------------------------------------------------
# The TF-IDF spaces, applied in numpy
# ---------------------------------------------------------------------------------------------

_MAX_ANALYSED_CHARS = 2048  # the deciding turn; a longer one is scored on its head and tail
_MAX_CONTEXT_CHARS = 512  # each earlier turn and the system prompt
_MAX_CHAR_NGRAM_CHARS = 256  # character n-grams serve short texts; words carry long ones
_CHAR_NGRAMS = (3, 3)  # trigrams: as accurate here as 2-4-grams, at a third of the cost
_WORD_WEIGHT = 0.5  # share of the word-n-gram cosine in the score; the rest is character n-grams
_DEFAULT_MARGIN = 0.01  # a text match must beat the default expert by this much: near-ties are noise
_SYSTEM_WEIGHT = 0.15  # a system prompt nudges the text match, it never decides it
_HISTORY_DECAY = 0.5  # each earlier turn weighs this much of the one after it
_ASSISTANT_FACTOR = 0.5  # an assistant turn weighs half a user turn at the same distance
_MIN_TURN_WEIGHT = 0.1  # lighter history turns are left out: they cost a vector each and change little


def _word_ngrams(text: str) -> list[str]:
    """The word analyzer (sklearn fits with it): tokens of two or more characters, and their bigrams."""
    tokens = [t for t in _tokens(text.lower()) if len(t) > 1]
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


# A term is identified by a 64-bit polynomial hash, so that all n-grams of a text are hashed at once
# from prefix sums: hash(text[s:e]) = B^(e-1) * (S[e] - S[s]) where S[i] = sum(c_j * B^-j for j < i).
_BASE = 0x100000001B3
_MASK = (1 << 64) - 1
_CHAR_SALT = np.uint64(0x5BD1E9955BD1E995)  # keeps the character n-gram "abc" apart from the word "abc"
_SPACE = 32


def _powers(base: int, count: int) -> np.ndarray:
    factors = np.full(count, base, dtype=np.uint64)
    factors[0] = 1
    return np.cumprod(factors, dtype=np.uint64)  # uint64 arithmetic wraps, i.e. works modulo 2**64


_MAX_HASHED = 2 * _MAX_ANALYSED_CHARS  # lower() may lengthen a text; anything longer is cut
_POW = _powers(_BASE, _MAX_HASHED + 2)
_INV_POW = _powers(pow(_BASE, -1, 1 << 64), _MAX_HASHED + 2)
_NEXT_POW = _POW[1:]
_SPACE_POW = _SPACE * _POW  # the space joining the two words of a bigram


def _term_hash(term: str) -> int:
    value = 0
    for char in term:
        value = (value * _BASE + ord(char)) & _MASK
    return value


def _prefix_sums(text: str) -> tuple[np.ndarray, np.ndarray]:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sums = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes * _INV_POW[: len(codes)], out=sums[1:])
    return codes, sums


def _word_hashes(codes: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Hashes of ``_word_ngrams`` (tokens of two or more characters, and bigrams) of a padded text."""
    gap = _IS_SEPARATOR[codes]
    edges = (gap[1:] != gap[:-1]).nonzero()[0] + 1  # the text is padded: token starts and ends alternate
    starts, ends = edges[0::2], edges[1::2]
    keep = ends - starts > 1
    starts, ends = starts[keep], ends[keep]
    unigrams = _POW[ends - 1] * (sums[ends] - sums[starts])
    following = (ends - starts)[1:]
    bigrams = unigrams[:-1] * _NEXT_POW[following] + _SPACE_POW[following] + unigrams[1:]
    return np.concatenate((unigrams, bigrams))


def _char_hashes(codes: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Hashes of sklearn's char_wb n-grams of a space-padded text: substrings with no space inside."""
    size = len(codes)
    inner_space = codes == _SPACE
    parts = []
    for n in range(_CHAR_NGRAMS[0], min(_CHAR_NGRAMS[1], size) + 1):
        hashes = _POW[n - 1 : size] * (sums[n:] - sums[: size - n + 1])
        if n > 2:
            clear = ~inner_space[1 : size - n + 2]
            for offset in range(2, n - 1):
                clear &= ~inner_space[offset : size - n + 1 + offset]
            hashes = hashes[clear]
        parts.append(hashes)
    return np.concatenate(parts) ^ _CHAR_SALT if parts else np.zeros(0, dtype=np.uint64)


class _HashIndex:
    """Exact lookup of 64-bit term hashes: a two-choice (cuckoo) table, two vectorised probes per query."""

    def __init__(self, keys: np.ndarray) -> None:
        bits = max(8, (4 * len(keys)).bit_length())  # load factor below 1/4
        while not self._build(keys, bits):
            bits += 1

    def _build(self, keys: np.ndarray, bits: int) -> bool:
        self.shift = np.uint64(64 - bits)
        self.keys = np.zeros(1 << bits, dtype=np.uint64)
        self.ids = np.full(1 << bits, -1, dtype=np.int32)
        first, _ = self._slots(keys)
        for item in range(len(keys)):
            key, ident, slot = keys[item], item, int(first[item])
            for _ in range(64):
                if self.ids[slot] < 0:
                    self.keys[slot], self.ids[slot] = key, ident
                    break
                self.keys[slot], key = key, self.keys[slot]
                self.ids[slot], ident = ident, int(self.ids[slot])
                a, b = (int(s[0]) for s in self._slots(np.array([key], dtype=np.uint64)))
                slot = b if slot == a else a
            else:
                return False
        return True

    def _slots(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._first(hashes), self._second(hashes)

    def _first(self, hashes: np.ndarray) -> np.ndarray:
        return ((hashes * np.uint64(0x9E3779B97F4A7C15)) >> self.shift).astype(np.intp)

    def _second(self, hashes: np.ndarray) -> np.ndarray:
        return (((hashes ^ (hashes >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)) >> self.shift).astype(np.intp)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Feature ids of the hashes found (misses dropped), in no particular order."""
        slots = self._first(hashes)
        found = self.keys[slots] == hashes
        rest = hashes[~found]
        other = self._second(rest)
        return np.concatenate((self.ids[slots[found]], self.ids[other[self.keys[other] == rest]]))


def _fit_vectorizers(texts: Sequence[str], sentences: Sequence[str]) -> tuple[TfidfVectorizer, TfidfVectorizer]:
    """Word and character vectorizers: vocabulary from every profile text, idf from the sentence-like ones.

    Counted over one-word keywords too, function words would look rare and outweigh the content.
    """
    fitted = []
    for options in ({"analyzer": _word_ngrams}, {"analyzer": "char_wb", "ngram_range": _CHAR_NGRAMS}):
        vocabulary = TfidfVectorizer(**options).fit(texts).vocabulary_
        fitted.append(TfidfVectorizer(vocabulary=vocabulary, sublinear_tf=True, **options).fit(sentences))
    return fitted[0], fitted[1]


class _Model:
    """Word and character TF-IDF, fitted by sklearn and applied in numpy through one hash index.

    Features are the word vocabulary followed by the character one. A query is normalised in each
    space separately and the profile rows are scaled by the space's weight, so one product gives
    ``w * cos(words) + (1 - w) * cos(chars)`` for every expert.
    """

    def __init__(self, texts: Sequence[str], sentences: Sequence[str], profiles: Sequence[str]) -> None:
        words, chars = _fit_vectorizers(texts, sentences)
        keys = np.array(
            [_term_hash(t) for t in words.get_feature_names_out()]
            + [_term_hash(t) ^ int(_CHAR_SALT) for t in chars.get_feature_names_out()],
            dtype=np.uint64,
        )
        if len(np.unique(keys)) != len(keys):
            raise ValueError("two routing terms share a hash; reword a keyword")
        self.index = _HashIndex(keys)
        self.word_features = len(words.idf_)
        self.idf = np.concatenate((words.idf_, chars.idf_))
        # (features x experts): each column is one expert's whole profile as a document.
        self.profiles = np.ascontiguousarray(np.vstack((
            _WORD_WEIGHT * words.transform(profiles).toarray().T,
            (1.0 - _WORD_WEIGHT) * chars.transform(profiles).toarray().T,
        )))

    def vector(self, lowered: str) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids, weights) of a lower-cased text, unit length in each space.

        Words come from the whole text (any whitespace separates them); character n-grams from its
        first ``_MAX_CHAR_NGRAM_CHARS`` characters, whole words only, whitespace normalised as sklearn does.
        """
        head = lowered[:_MAX_CHAR_NGRAM_CHARS]
        if len(lowered) > _MAX_CHAR_NGRAM_CHARS:
            head = head.rsplit(None, 1)[0]
        hashes = np.concatenate((_word_hashes(*_prefix_sums(" " + lowered[:_MAX_HASHED] + " ")),
                                 _char_hashes(*_prefix_sums(" " + " ".join(head.split()) + " "))))
        ids = np.sort(self.index.lookup(hashes))
        if not len(ids):
            return ids, np.zeros(0)
        first = np.empty(len(ids), dtype=bool)
        first[0] = True
        np.not_equal(ids[1:], ids[:-1], out=first[1:])
        starts = first.nonzero()[0]
        counts = np.concatenate((starts[1:], (len(ids),))) - starts
        ids = ids[starts]
        return ids, self._normalised(ids, (1.0 + np.log(counts)) * self.idf[ids])

    def _normalised(self, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        split = int(ids.searchsorted(self.word_features))  # ids are sorted: words first
        for part in (values[:split], values[split:]):
            norm = math.sqrt(part @ part)
            if norm:
                part /= norm
        return values

    def scores(self, turns: Sequence[tuple[float, str]]) -> np.ndarray:
        """Every expert's score for the weighted sum of the turns' vectors."""
        vectors = [(weight, *self.vector(text)) for weight, text in turns]
        if len(vectors) == 1:
            _, ids, values = vectors[0]
        else:
            combined = np.bincount(np.concatenate([ids for _, ids, _ in vectors]),
                                   weights=np.concatenate([w * v for w, _, v in vectors]))
            ids = combined.nonzero()[0]
            values = self._normalised(ids, combined[ids])
        return values @ self.profiles[ids]


def _clip(text: str, limit: int) -> str:
    """Head and tail of a long text, where a request's intent usually sits."""
    if len(text) <= limit:
        return text
    head = limit * 3 // 4
    return text[:head] + "\n" + text[len(text) - (limit - head):]


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteDecision:
    """Which expert answers, every expert's text score (highest first), and why."""

    expert: str
    scores: dict[str, float]
    reason: str
    confidence: float  # 1.0 when a structural rule decided, else the chosen expert's cosine score
    elapsed_ms: float

    def ranking(self) -> tuple[str, ...]:
        """Expert ids best first: the chosen expert, then the others by score (for consensus)."""
        return (self.expert, *(e for e in self.scores if e != self.expert))


def _profile_documents(expert: ExpertConfig) -> list[str]:
    """The texts that describe an expert: together they are its profile, and they make the vocabulary."""
    return [expert.domain, expert.description, *expert.routing.keywords, *expert.routing.examples]


def _sentences(expert: ExpertConfig) -> list[str]:
    """The expert's texts that read like requests: how common a term is gets measured on these."""
    return [expert.description, *expert.routing.examples]


def _first(experts: Sequence[ExpertConfig], test: Callable[[ExpertConfig], bool]) -> str | None:
    return next((e.id for e in experts if test(e)), None)


class Router:
    """Fitted once from the experts' profiles; ``route`` reads only, so it is safe to call concurrently."""

    def __init__(self, experts: Sequence[ExpertConfig], default_expert: str, threshold: float) -> None:
        if not experts:
            raise ValueError("the router needs at least one expert")
        self.experts: tuple[str, ...] = tuple(e.id for e in experts)
        if default_expert not in self.experts:
            raise ValueError(f"default expert {default_expert!r} is not one of {self.experts}")
        self.default_expert = default_expert
        self.threshold = threshold
        # Images go to a model that reads them, else to the multimodal domain, whose text-only stand-in
        # (the embedded default) then answers with a clear 400 instead of a wrong expert guessing.
        self.vision_expert = (_first(experts, lambda e: e.vision)
                              or _first(experts, lambda e: e.domain.lower() == "multimodal"))
        self.multilingual_expert = _first(experts, lambda e: e.multilingual)
        self.coding_expert = _first(experts, lambda e: e.domain.lower() in ("coding", "code", "programming"))

        documents = [_profile_documents(e) for e in experts]
        self._model = _Model([text for docs in documents for text in docs],
                             [text for e in experts for text in _sentences(e)],
                             [" \n ".join(docs) for docs in documents])

    @classmethod
    def from_config(cls, config: AppConfig) -> "Router":
        return cls(config.experts, config.default_expert, config.router.threshold)

    def route_prompt(self, prompt: str) -> RouteDecision:
        """Route a bare completion prompt as if it were one user turn."""
        return self.route((ChatMessage(role="user", content=prompt),))

    def route(self, messages: Sequence[ChatMessage]) -> RouteDecision:
        """The expert for a conversation: any image, else the last user turn's signals, else the text match."""
        started = time.perf_counter()
        last = _deciding_turn(messages)
        text = _clip(messages[last].text, _MAX_ANALYSED_CHARS) if messages else ""
        scores = self._scores(_weighted_turns(messages, last, text))
        expert, reason, confidence = self._decide(messages, text, scores)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return RouteDecision(expert, scores, reason, confidence, elapsed_ms)

    def _decide(self, messages: Sequence[ChatMessage], text: str, scores: dict[str, float]) -> tuple[str, str, float]:
        """Structural rules in order of certainty, then the best text match or the default."""
        if self.vision_expert and any(m.has_images for m in messages):
            return self.vision_expert, "image content", 1.0
        code = _code_evidence(text)
        words = _words(code.prose)
        language = detect_language(code.prose, words)
        if language != "en" and self.multilingual_expert:
            if self.coding_expert and code.share >= _CODE_SHARE:
                return self.coding_expert, f"mostly code, non-English text ({language})", 1.0
            return self.multilingual_expert, f"non-English text ({language})", 1.0
        if code.structural and self.coding_expert:
            return self.coding_expert, code.structural, 1.0
        if self.multilingual_expert and is_translation_request(code.prose, words):
            return self.multilingual_expert, "translation request", 1.0
        best, best_score = next(iter(scores.items()))
        if best_score < self.threshold:
            return self.default_expert, "below threshold: default expert", scores[self.default_expert]
        if best != self.default_expert and best_score - scores[self.default_expert] < _DEFAULT_MARGIN:
            return self.default_expert, "no clear match: default expert", scores[self.default_expert]
        return best, "tf-idf best match", best_score

    def _scores(self, turns: Sequence[tuple[float, str]]) -> dict[str, float]:
        """Every expert's cosine score, highest first, ties in config order."""
        total = self._model.scores(turns) if turns else np.zeros(len(self.experts))
        rounded = total.round(6).tolist()
        order = sorted(range(len(self.experts)), key=lambda i: (-rounded[i], i))
        return {self.experts[i]: rounded[i] for i in order}


def _deciding_turn(messages: Sequence[ChatMessage]) -> int:
    """The last user turn, else the last non-system turn, else the last turn (-1 when there is none)."""
    for wanted in (lambda m: m.role == "user", lambda m: m.role not in ("system", "developer"), lambda m: True):
        for i in range(len(messages) - 1, -1, -1):
            if wanted(messages[i]):
                return i
    return -1


def _weighted_turns(messages: Sequence[ChatMessage], last: int, text: str) -> list[tuple[float, str]]:
    """Lower-cased turns with their weight: the deciding one 1, history decaying, system prompts small."""
    turns = [(1.0, text.lower())] if text.strip() else []
    distance = 0
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if i == last or not message.text.strip():
            continue
        if message.role in ("system", "developer"):
            weight = _SYSTEM_WEIGHT
        else:
            distance += i < last
            weight = _HISTORY_DECAY ** max(distance, 1)
            if message.role == "assistant":
                weight *= _ASSISTANT_FACTOR
        if weight >= _MIN_TURN_WEIGHT:
            turns.append((weight, _clip(message.text, _MAX_CONTEXT_CHARS).lower()))
    return turns
