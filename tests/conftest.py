"""Shared fixtures: a real tiny byte-level BPE tokenizer, a real tiny random Llama, and a
throwaway PostgreSQL server.

The ``pg_server`` fixture runs Debian's PostgreSQL (``/usr/lib/postgresql/<ver>/bin``)
in a temporary directory on 127.0.0.1 and a free port, as the ``postgres`` user
when the tests run as root (initdb and postgres refuse root), and stops it at the
end of the session. Without the server binaries or psycopg its tests are skipped
with the reason; CI installs both (.ci/run).
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rbridge.store.db import POSTGRES_HINT

# One local process per plan unless a test asks for more (tests/test_local_workers.py): the suite
# already runs plans side by side (pytest -n), and crash tests kill "the plan" as one process.
os.environ.setdefault("RBRIDGE_WORKERS", "1")

try:
    import psycopg
except ImportError:  # the server tests skip; tests that need no server still run
    psycopg = None

REPO = Path(__file__).resolve().parents[1]

# The `sources:` block of the tests' small plans: three of the repository's shipped corpora.
SOURCES = "sources:\n" + "".join(f"  {name}: {{path: {REPO}/specs/data/{file}}}\n" for name, file in
                                  (("cot", "cot.jsonl.gz"), ("spam", "spam.jsonl.gz"), ("kjv", "kjv.txt.gz")))


def gsm8k_lines(n: int) -> str:
    """The first ``n`` traces of the shipped GSM8K traces file, as JSONL text."""
    return "\n".join((REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:n]) + "\n"


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CORPUS = [
    "Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether.",
    "Weng earns 12/60 = 0.2 per minute.", "Working 50 minutes, she earned 0.2 x 50 = 10.",
    "Café crème costs 3 €, and 😀 is a smile.", "The answer is 72.\nThe answer is 10.",
] * 20


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one CPU thread for a module: tiny models on a shared CPU gain nothing from a second
    thread (it mostly waits for the first; 3x slower here), and launched ranks run one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():   # random init is too flat to tell tokens apart; sharpen it
        m.lm_head.weight.mul_(30.0)
    return m.eval()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One RBRIDGE_CACHE for the plans of the whole test run, shared by pytest -n's workers, as a user's
    plans share ``~/.cache/rbridge``: the tests' plans train the same tokenizers on the same shipped corpora
    (the crash spec's in tests/test_resume.py, test_local_workers.py, test_slurm.py, test_disk.py and
    test_mixture_search.py; the tiny plan's in test_plan_e2e.py, test_postgres.py, test_workers.py,
    test_failed_runs.py and test_targets.py), and each plan with a cold cache spent about 4 s of CPU
    training and tokenizing again. Entries are published atomically
    (rbridge.data._cache), so processes filling it at once are safe. Tests of the cache itself, and of the
    stores registry kept in it, keep a cache of their own."""
    path = run_root(tmp_path_factory) / "rbridge-cache"
    path.mkdir(exist_ok=True)
    return path


def run_root(tmp_path_factory) -> Path:
    """The folder of the whole test run, shared by pytest -n's workers (each worker's base is a folder in it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def built_once(tmp_path_factory, name: str, build) -> tuple[Path, dict]:
    """A folder made once per test run and shared by pytest -n's workers: the first to ask runs
    ``build(folder)`` (which returns what the tests need to know of it, as JSON), the others wait on a file
    lock and read that. A module fixture is made again on each worker that runs one of the module's tests
    (tests/test_resume.py's plan was built three times a run), and another module may need the same plan.
    Tests never change the folder: they copy it (copy_folder) or read what ``build`` returned. A failed build
    leaves nothing recorded, so the next test to ask builds again and fails with the same message."""
    import fcntl
    import json

    root = run_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())


# ---------------------------------------------------------------------------- server
def _pg_bindir() -> Path | None:
    """Debian's newest PostgreSQL server binaries, else initdb/postgres on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) if x.isdigit() else 0
                                                                         for x in Path(p).parent.name.split(".")])
    for d in reversed(found):
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres and Path(initdb).parent == Path(postgres).parent:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server():
    """Base URL (no database) of a throwaway PostgreSQL server on 127.0.0.1."""
    if psycopg is None:
        pytest.skip(f"psycopg is not installed ({POSTGRES_HINT})")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    run_as: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        import pwd
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    tmp = Path(tempfile.mkdtemp(prefix="rbridge-pg-"))
    if run_as:
        os.chown(tmp, run_as["user"], run_as["group"])
    data = tmp / "data"
    init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "rbridge", "-A", "trust", "-E", "UTF8",
                           "--no-sync"], cwd=tmp, capture_output=True, text=True, timeout=120, **run_as)
    assert init.returncode == 0, init.stdout + init.stderr
    port = _free_port()
    log = open(tmp / "server.log", "w")
    if run_as:
        os.chown(tmp / "server.log", run_as["user"], run_as["group"])
    server = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                               "-k", str(tmp), "-F", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
                               "-c", "max_connections=50"],
                              cwd=tmp, stdout=log, stderr=subprocess.STDOUT, **run_as)
    base = f"postgresql://rbridge@127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(f"{base}/postgres", connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start:\n" + (tmp / "server.log").read_text())
                time.sleep(0.2)
        yield base
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def new_database(base: str, name: str) -> str:
    with psycopg.connect(f"{base}/postgres", autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}"')
        con.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def pytest_configure(config):
    config.addinivalue_line("markers", "long(seconds): a test, or a module run as one xdist group, of a minute or "
                                       "more (SLURM, a server, killed workers, a shared plan fixture), with about "
                                       "how long it takes on 2 cores; scheduled first, the longest first")


def pytest_collection_modifyitems(config, items):
    """The tests marked ``long`` first, the longest first (``long(seconds)``), then the rest as collected.
    Under ``pytest -n --dist loadgroup`` the workers take work from the front: first the xdist groups (the
    largest first: pytest-xdist orders its work units by their number of tests), then single tests in this
    order. A long single test started last leaves every other worker idle while it finishes (the SLURM test
    alone held the last 100 s of a 530 s suite on 2 cores); started first, it overlaps the short ones. Tests
    of one group or module that share a module fixture carry the same seconds, so they stay side by side and
    the fixture is built once (split, it is torn down when another module's test runs between them)."""
    def seconds(item) -> float:
        mark = item.get_closest_marker("long")
        return 0.0 if mark is None else float(mark.args[0] if mark.args else mark.kwargs.get("seconds", 60))

    items[:] = sorted(items, key=lambda item: -seconds(item))


def repoint_store(db, src, dst) -> None:
    """A SQLite store copied from folder ``src`` to ``dst`` (with its run folders): the paths it records
    (each run's folder, the plan's spec) moved to the copy, so commands on the copy never touch ``src``."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE runs SET checkpoint = replace(checkpoint, ?, ?)", (str(src), str(dst)))
        con.execute("UPDATE plans SET spec_path = replace(spec_path, ?, ?)", (str(src), str(dst)))


def copy_folder(src, dst, ignore=None):
    """shutil.copytree of a folder holding a SQLite store that this process may have read. Connections the
    tests opened and dropped can sit in reference cycles until the garbage collector runs; the last one to
    close deletes the store's -shm and -wal files, so a copy taken meanwhile could list a file that is gone
    when it is read. Collect first: every dropped connection is closed before the folder is listed."""
    import gc

    gc.collect()
    return shutil.copytree(src, dst, ignore=ignore)
