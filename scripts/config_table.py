"""Print the README's run-config key table from the declarations, or rewrite it in README.md (--write).

    python scripts/config_table.py --write

The table sits under the heading "Run-config keys"; tests/test_structure.py fails when it
differs from what the components declare (fedbilevel.config.key_table).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fedbilevel.config import key_table

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    if not args.write:
        print(key_table())
        return
    text = README.read_text()
    # The table: the first run of lines starting with "| key |" under the heading, up to a non-table line.
    pattern = re.compile(r"(### Run-config keys[^\n]*\n\n)(\|[^\n]*\n)+")
    if not pattern.search(text):
        raise SystemExit(f"{README}: no table under '### Run-config keys'")
    README.write_text(pattern.sub(lambda match: match.group(1) + key_table() + "\n", text, count=1))
    print(f"{README}: key table rewritten")


if __name__ == "__main__":
    main()
