"""Regenerate ``imagenet_hierarchy.tsv`` from an installed WordNet 3.0.

    python -m collection.data.make_hierarchy [--wordnet /usr/share/wordnet] [--out FILE]

Keeps only the noun synsets on the hypernym paths of the 1,000 ImageNet classes
(each class id, e.g. ``n02110063``, is a WordNet 3.0 noun offset), up to ``entity``.
Every hypernym of every synset on those paths is followed (WordNet gives some
synsets two), so the table holds all paths, not only the first. Debian's
``wordnet-base`` package installs the data files in /usr/share/wordnet.

Columns (tab-separated, one synset a line, sorted by wnid, after a header line):
``wnid``, ``class`` (ImageNet class index 0-999, or empty for a category that is
not a class), ``name`` (the ImageNet label for a class, as the ``labels`` table
stores it; else the synset's first lemma), ``lemmas`` (every word WordNet has for
the synset, joined by ``; ``), ``parents`` (hypernym wnids, the first one first,
joined by spaces; empty for ``entity``) and ``gloss``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent / "imagenet_hierarchy.tsv"
COLUMNS = ("wnid", "class", "name", "lemmas", "parents", "gloss")
HYPERNYMS = ("@", "@i")  # hypernym and instance hypernym pointers


def read_nouns(wordnet: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """offset -> (lemmas, hypernym offsets, gloss) for every noun synset in data.noun."""
    nouns = {}
    with open(wordnet / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):  # the licence header
                continue
            data, _, gloss = line.partition(" | ")
            fields = data.split()
            offset, count = fields[0], int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
            at = 4 + 2 * count
            pointers = int(fields[at])
            hypernyms = [
                fields[at + 2 + 4 * i]
                for i in range(pointers)
                if fields[at + 1 + 4 * i] in HYPERNYMS and fields[at + 3 + 4 * i] == "n"
            ]
            nouns[offset] = (lemmas, hypernyms, gloss.strip())
    return nouns


def hierarchy_rows(classes: list[tuple[str, str]], nouns: dict) -> list[tuple[str, ...]]:
    """The table's rows: the classes and every synset above them, sorted by wnid."""
    class_of = {wnid: (index, name) for index, (wnid, name) in enumerate(classes)}
    seen: set[str] = set()
    todo = [wnid[1:] for wnid, _ in classes]
    while todo:
        offset = todo.pop()
        if offset in seen:
            continue
        if offset not in nouns:
            raise SystemExit(f"n{offset} is not a noun synset of this WordNet: is it 3.0?")
        seen.add(offset)
        todo.extend(nouns[offset][1])
    rows = []
    for offset in sorted(seen):
        lemmas, hypernyms, gloss = nouns[offset]
        wnid = f"n{offset}"
        index, name = class_of.get(wnid, ("", lemmas[0]))
        rows.append(
            (wnid, str(index), name, "; ".join(lemmas), " ".join(f"n{h}" for h in hypernyms), gloss)
        )
    return rows


def render(rows: list[tuple[str, ...]]) -> str:
    for row in rows:
        if any("\t" in value or "\n" in value for value in row):
            raise SystemExit(f"a tab or newline inside {row[0]}'s fields")
    return "".join("\t".join(row) + "\n" for row in [COLUMNS, *rows])


def make(wordnet: Path = WORDNET) -> str:
    """The file's text, made from the WordNet at ``wordnet`` and keras-hub's class list."""
    from collection.models import imagenet_classes

    return render(hierarchy_rows(imagenet_classes(), read_nouns(wordnet)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="folder holding data.noun")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        sys.exit(f"no data.noun in {args.wordnet}: install WordNet 3.0 (apt-get install wordnet-base)")
    text = make(args.wordnet)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {text.count(chr(10)) - 1} synsets, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
