"""The training corpus beyond the standard library and the out-of-domain benchmark: deterministic,
de-duplicated, a fixed held-out split, and no evaluated text among the training text."""

from __future__ import annotations

import gzip

from calibration.corpus import (corpus_manifest, is_held_out, manpage_pairs, package_sentences, troff_text)
from calibration.retrieval import docstring_pairs


def test_package_sentences_are_deterministic_distinct_prose_without_excluded_text():
    first = package_sentences(("click", "jinja2"))
    assert first == package_sentences(("click", "jinja2")) and len(first) > 300
    assert len(set(first)) == len(first)
    assert all(6 <= len(s.split()) <= 40 and s[0].isupper() for s in first)
    excluded = set(first[:10])
    assert not excluded & set(package_sentences(("click", "jinja2"), excluded))
    assert [row["package"] for row in corpus_manifest(("click", "jinja2"))] == ["click", "jinja2"]


def test_the_held_out_split_is_fixed_by_the_sentence_alone():
    sentences = package_sentences(("click", "jinja2"))
    held = [s for s in sentences if is_held_out(s)]
    assert 0.01 < len(held) / len(sentences) < 0.12  # about 5 %
    assert held == [s for s in reversed(sentences) if is_held_out(s)][::-1]  # independent of order


def write_page(root, section, name, body):
    folder = root / f"man{section}"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{name}.{section}.gz", "wt") as handle:
        handle.write(body)


def test_manual_pages_give_one_description_per_command_deterministically(tmp_path):
    write_page(tmp_path, "1", "frob", '.TH FROB 1\n.SH NAME\nfrob \\- frobnicate the widget files in place\n.SH SYNOPSIS\n')
    write_page(tmp_path, "1", "lsw", '.SH "NAME"\nlsw, lswidgets \\- list the \\fBwidget\\fR directory contents\n.SH X\n')
    write_page(tmp_path, "8", "frobd", ".SH NAME\nfrobd \\- frobnicate the widget files in place\n")  # same text
    write_page(tmp_path, "1", "short", ".SH NAME\nshort \\- too short\n")
    write_page(tmp_path, "1", "broken", "no sections at all\n")
    (tmp_path / "man1" / "notgzip.1.gz").write_text("plain")
    pairs = manpage_pairs(tmp_path)
    assert pairs == [("frobnicate the widget files in place", "frob"), ("list the widget directory contents", "lsw")]
    assert manpage_pairs(tmp_path) == pairs and manpage_pairs(tmp_path, limit=1) in ([pairs[0]], [pairs[1]])
    assert troff_text(r"\fBls\fR \- list \(em files") == "ls - list - files"


def test_no_evaluated_text_is_training_text():
    queries = {q for q, _ in docstring_pairs()}
    training = package_sentences(("click", "jinja2"), queries)
    assert not queries & set(training)
    man_queries = {q for q, _ in manpage_pairs()}  # empty where no manual pages are installed
    assert not man_queries & set(package_sentences(("click", "jinja2"), man_queries))
