"""Real text for the data benchmarks, from a registry package: Debian's linux-source.

The Linux kernel's source tree (C, headers, assembly, reStructuredText docs,
Kconfig and Makefiles; GPL-2.0) is about 1.3 GB of real text in one package.
It is downloaded with ``apt-get download`` into a work folder (or taken from a
``.deb`` already there), unpacked, and written as documents (one file each);
nothing of it is committed or vendored.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".c", ".h", ".S", ".rst", ".txt", ".py", ".sh", ".json", ".yaml", ".dts", ".dtsi", ".pl",
                 ".awk", ".tc", ".cocci", ".rs", ".lds", ".asn1", ".bc", ".tbl"}
TEXT_NAMES = {"Kconfig", "Makefile", "Kbuild", "README", "MAINTAINERS", "CREDITS"}


def kernel_documents(work: Path, deb: Path | None = None) -> Iterator[str]:
    """The kernel tree's text files, one document each, in tarball order (downloads the package once)."""
    work.mkdir(parents=True, exist_ok=True)
    if deb is None:
        found = sorted(glob.glob(str(work / "linux-source-*.deb")))
        if not found:
            subprocess.run(["apt-get", "download", "linux-source-6.1"], cwd=work, check=True,
                           stdout=subprocess.DEVNULL)
            found = sorted(glob.glob(str(work / "linux-source-*.deb")))
        deb = Path(found[0])
    unpacked = work / "deb"
    if not unpacked.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    [tarball] = glob.glob(str(unpacked / "usr/src/linux-source-*.tar.*"))
    with tarfile.open(tarball) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if not member.isfile() or member.size > (1 << 20):
                continue
            if os.path.splitext(name)[1] not in TEXT_SUFFIXES and name not in TEXT_NAMES:
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            if text.strip():
                yield text


def write_jsonl(path: Path, docs: Iterator[str], min_bytes: int) -> tuple[int, int]:
    """Documents as JSON lines until at least ``min_bytes`` are written (cycling the documents with a
    copy number when they run out); returns (documents, bytes)."""
    cached: list[str] = []
    n = size = 0
    with open(path, "w", encoding="utf-8") as fh:
        copy = 0
        source = docs
        while size < min_bytes:
            for doc in source:
                if copy == 0:
                    cached.append(doc)
                line = json.dumps({"text": doc if copy == 0 else f"/* copy {copy} */\n{doc}"}) + "\n"
                fh.write(line)
                size += len(line.encode("utf-8"))
                n += 1
                if size >= min_bytes:
                    break
            copy += 1
            source = iter(cached)
    return n, size


class PeakRSS:
    """The peak resident memory of a process and all its children (summed), sampled every 0.1 s."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak
