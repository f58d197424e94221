"""Training text beyond the standard library, and a benchmark from a domain it never contains.

**Training text** (``package_sentences``): the prose sentences of the docstrings of installed
Python packages — numpy, torch, transformers and the rest of the export extra — read from their
source files with ``ast`` (nothing is imported or run), cleaned (6 to 40 words, a capital first,
nearly all letters: no code, no tables) and de-duplicated (first occurrence kept, files in sorted
order: deterministic for a set of installed versions, which ``corpus_manifest`` records with each
package's licence). A fixed share of it is held out by a hash of the sentence (``is_held_out``), so
the split does not depend on order or on which other sentences exist.

**Out-of-domain benchmark** (``manpage_pairs``): the Debian manual pages of commands. The query is
a page's one-line NAME description ("list directory contents"), the answer its command ("ls"),
among all the commands of the benchmark. Manual pages never enter the training text.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from deploy.text import prose_sentences

# The export extra's packages and the libraries they bring: permissive licences (BSD, MIT, Apache).
CORPUS_PACKAGES = ("numpy", "torch", "transformers", "accelerate", "safetensors", "optimum", "onnx", "sympy",
                   "networkx", "jinja2", "click", "tqdm", "huggingface_hub", "filelock", "fsspec", "packaging",
                   "requests", "urllib3", "yaml", "psutil", "matplotlib", "scipy")
HELD_OUT_PER_MILLE = 50  # 5 % of the sentences, chosen by hash


def is_held_out(sentence: str) -> bool:
    """The fixed held-out split: about 5 % of sentences, by a hash of the sentence alone."""
    return int(hashlib.sha256(sentence.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


def package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None:
        return []
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] or ([Path(spec.origin)] if spec.origin else [])
    files = []
    for root in roots:
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*.py") if "tests" not in p.parts
                                                      and "test" not in p.parts)
    return files


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return []
    return [ast.get_docstring(node) or "" for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]


def package_sentences(packages=CORPUS_PACKAGES, exclude: set[str] = frozenset()) -> list[str]:
    """De-duplicated prose sentences of the packages' docstrings, in a fixed order, without
    ``exclude`` (evaluation text). Both splits: filter with ``is_held_out``."""
    docs = [doc for package in packages for path in package_files(package) for doc in docstrings(path)]
    return [s for s in prose_sentences(docs, None, 6, 40) if s not in exclude]


def corpus_manifest(packages=CORPUS_PACKAGES) -> list[dict]:
    """Provenance: each package found, its version and its declared licence."""
    rows = []
    for package in packages:
        if importlib.util.find_spec(package) is None:
            continue
        distribution = {"yaml": "PyYAML", "optimum": "optimum-onnx"}.get(package, package)
        try:
            metadata = importlib.metadata.metadata(distribution)
            licence = metadata.get("License-Expression") or metadata.get("License") or ""
            rows.append({"package": package, "version": metadata["Version"], "license": licence.splitlines()[0][:60]
                         if licence else "see the package"})
        except importlib.metadata.PackageNotFoundError:
            rows.append({"package": package, "version": None, "license": "see the package"})
    return rows


TROFF_FONT = re.compile(r"\\f(\[[A-Z]*\]|\(..|.)")
TROFF_ESCAPE = re.compile(r"\\(\(..|\[[^]]*\]|[&|^ ])")


def troff_text(line: str) -> str:
    """A troff line as plain text: fonts and special-character escapes dropped, ``\\-`` a hyphen."""
    line = TROFF_FONT.sub("", line).replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-")
    return " ".join(TROFF_ESCAPE.sub("", line).replace("\\e", "\\").split())


def name_line(path: Path) -> str | None:
    """The NAME section's text of a gzip'd manual page (``ls \\- list directory contents``)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            lines = handle.read(200_000).splitlines()
    except (OSError, EOFError):
        return None
    for index, line in enumerate(lines):
        if re.match(r'^\.S[Hh]\s+"?NAME"?\s*$', line.strip()):
            body = []
            for following in lines[index + 1:index + 6]:
                if following.startswith((".SH", ".Sh")):
                    break
                if following.startswith((".", "'")) and not following.startswith((".B ", ".I ")):
                    continue
                body.append(following.lstrip(".BI "))
            return troff_text(" ".join(body)) or None
    return None


def manpage_pairs(root: str | Path = "/usr/share/man", sections: tuple[str, ...] = ("1", "8"), limit: int = 500,
                  min_words: int = 4) -> list[tuple[str, str]]:
    """(description, command) pairs from the manual pages under ``root``: deterministic (sorted
    files; the ``limit`` items with the smallest hash of their command), one per command and per
    description (duplicates dropped), descriptions of at least ``min_words`` words."""
    items, names, descriptions = [], set(), set()
    for section in sections:
        for path in sorted(Path(root, f"man{section}").glob(f"*.{section}*.gz")):
            text = name_line(path)
            if not text or " - " not in text:
                continue
            names_part, description = text.split(" - ", 1)
            command = names_part.split(",")[0].strip()
            description = description.strip().rstrip(".")
            if (not command or command in names or description.lower() in descriptions
                    or len(description.split()) < min_words or not re.fullmatch(r"[\w.+:\[-]+", command)):
                continue
            names.add(command)
            descriptions.add(description.lower())
            items.append((description, command))
    items.sort(key=lambda pair: hashlib.sha256(pair[1].encode()).hexdigest())
    return sorted(items[:limit], key=lambda pair: pair[1])
