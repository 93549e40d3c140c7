"""Regenerate `src/mixt5/resources/squad_dev_sample.json`: the first questions of the official SQuAD v1.1 dev set.

    python scripts/make_squad_sample.py [--source ../shared/data/squad/dev-v1.1.json] [--num_questions 200]

Paragraphs are copied whole, in order, until the sample holds `--num_questions` questions; the last paragraph keeps
only the questions needed. The output keeps the official layout and `version`.
"""

import argparse
from pathlib import Path

from mixt5.utils import read_json, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json")
    parser.add_argument("--output", type=Path, default=ROOT / "src" / "mixt5" / "resources" / "squad_dev_sample.json")
    parser.add_argument("--num_questions", type=int, default=200)
    args = parser.parse_args()

    squad, left, data = read_json(args.source), args.num_questions, []
    for article in squad["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left == 0:
                break
            paragraphs.append({**paragraph, "qas": paragraph["qas"][:left]})
            left -= len(paragraphs[-1]["qas"])
        if paragraphs:
            data.append({**article, "paragraphs": paragraphs})
    write_json_atomic(args.output, {"data": data, "version": squad["version"]}, indent=None)
    print(f"wrote {args.num_questions - left} questions in {len(data)} article(s) to {args.output}")


if __name__ == "__main__":
    main()
