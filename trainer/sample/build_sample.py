"""Rebuild the embedded sample corpus from Debian's ``bible-kjv`` package.

The sample is the King James Version of the Bible (1611/1769 text, public domain),
one JSON line per chapter ({"title": "Genesis 1", "text": ...}), gzip-compressed.
It exists so that the demo and the tests run with no network at all.

    apt-get install bible-kjv
    python trainer/sample/build_sample.py      # rewrites trainer/sample/kjv.jsonl.gz

The output is deterministic (fixed gzip mtime), so rebuilding does not churn git.
"""
from __future__ import annotations

import gzip
import json
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).with_name("kjv.jsonl.gz")
CHAPTER = re.compile(r"^(\S.*\d+)$")  # "Genesis 1", "1 Kings 3", "Song of Solomon 2"
VERSE = re.compile(r"^\s+\d+ (.*)$")


def chapters(raw: str):
    title, verses = None, []
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = VERSE.match(line)
        if m:
            verses.append(m.group(1).strip())
        elif CHAPTER.match(line):
            if title and verses:
                yield title, verses
            title, verses = line.strip(), []
    if title and verses:
        yield title, verses


def main() -> None:
    raw = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], check=True,
                         capture_output=True, text=True).stdout
    n = 0
    with open(OUT, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        for title, verses in chapters(raw):
            text = title + "\n\n" + "\n".join(verses) + "\n"
            gz.write((json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n").encode())
            n += 1
    print(f"wrote {n} chapters to {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
