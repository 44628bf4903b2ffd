"""Shared fixtures: the paper's data, locally trained tokenizers, a fake OpenAI endpoint;
and one model cache for the whole test session.

The data is the full release in shared/data beside the checkout when it is there, else
the first few dozen records of each released file, kept in tests/data/ (the same file
names and layout), so that every test module runs in any clone. Tests that compare
with the full released files take the ``release_dir`` fixture and are skipped without it.

The cache ($CATTUNE_CACHE, where the built-in models are joined and converted) is a
temporary directory made when this file is imported, removed when the session ends: no
test writes into ~/.cache. pytest-xdist workers inherit it from the controller, so the
file locks of cattune.models make each model be converted once per session however
many workers want it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The session's cache, made before anything can load a model. The controller of an xdist
# run makes it and sets it in the environment that its workers (and every CLI subprocess
# a test starts) inherit; a worker, or a pytest started by a test, uses the one it finds.
_SESSION_CACHE = "CATTUNE_TEST_SESSION_CACHE"
_OWN_CACHE = None
if not os.environ.get(_SESSION_CACHE):
    _OWN_CACHE = tempfile.mkdtemp(prefix="cattune-test-cache-")
    os.environ[_SESSION_CACHE] = _OWN_CACHE
os.environ["CATTUNE_CACHE"] = os.environ[_SESSION_CACHE]

# Under pytest-xdist each worker has one core's share (the Makefile starts one worker per
# core): one torch thread here, and the same for the CLI subprocesses a test starts, which
# inherit OMP_NUM_THREADS. Without it two workers run four threads on CI's two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

from fake_openai import FakeOpenAI

from cattune.records import load_records
from cattune.sources import find_data_dir as find_shared_data
from cattune.tiny import train_tokenizer


def find_data_dir() -> Path:
    """The paper's data, where cattune's downstream tasks find it (cattune.sources):
    $CATTUNE_SHARED_DATA, else shared/data beside the checkout (CI clones the repository
    next to shared/), else beside the repository this one was cloned from."""
    return find_shared_data() or Path(__file__).resolve().parents[2] / "shared" / "data"


RELEASE_DIR = find_data_dir()
HAVE_RELEASE = (RELEASE_DIR / "stg_paper").is_dir()
FIXTURE_DIR = Path(__file__).resolve().parent / "data"
# The full files when they are there: the tests built on them then see every record.
DATA_DIR = RELEASE_DIR if HAVE_RELEASE else FIXTURE_DIR
NO_RELEASE = (f"the paper's released files are not at {RELEASE_DIR} (shared/data beside the checkout, or "
              "$CATTUNE_SHARED_DATA): this comparison with the full files is skipped")

STG_E_FILES = {
    "train_L": "spurious_token_game_train3.jsonl",
    "train_M": "spurious_token_game_train3_M.jsonl",
    "train_S": "spurious_token_game_train3_S.jsonl",
    "iid_test": "spurious_token_game_test3.jsonl",
    "ood_test": "spurious_token_game_ood3_2.jsonl",
}
STG_H_FILES = {"train": "STG_H_train.jsonl", "iid_test": "STG_H_iid_test.jsonl", "ood_test": "STG_H_ood_test.jsonl"}


def pytest_unconfigure(config):
    if _OWN_CACHE:  # the session's end: every xdist worker has finished
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The full release if present, else the fixtures in tests/data."""
    return DATA_DIR


@pytest.fixture(scope="session")
def release_dir() -> Path:
    """The full release; a test that needs it is skipped, with the reason, without it."""
    if not HAVE_RELEASE:
        pytest.skip(NO_RELEASE)
    return RELEASE_DIR


@pytest.fixture(scope="session")
def svamp_train(data_dir):
    return load_records(data_dir / "svamp_train_annotated.jsonl")


@pytest.fixture(scope="session")
def stg_e_released(data_dir):
    return {split: load_records(data_dir / "stg_paper" / name) for split, name in STG_E_FILES.items()}


@pytest.fixture(scope="session")
def stg_h_released(data_dir):
    return {split: load_records(data_dir / "stg_paper" / name) for split, name in STG_H_FILES.items()}


@pytest.fixture(scope="session")
def annotated_corpus(svamp_train, stg_e_released, stg_h_released):
    """Every annotated record we have: SVAMP (LLM-made annotations) and the STG train files."""
    return {
        "svamp": svamp_train,
        "stg_e": stg_e_released["train_L"],
        "stg_h": stg_h_released["train"],
    }


@pytest.fixture(scope="session")
def tokenizers(annotated_corpus):
    """A byte-level BPE (GPT-2 style, no BOS) and a Metaspace BPE (sentencepiece style,
    BOS in front), both trained on the data text: the two offset conventions we support."""
    texts = [r.text for records in annotated_corpus.values() for r in records]
    return {kind: train_tokenizer(texts, kind, vocab_size=1000, individual_digits=True)
            for kind in ("bytelevel", "metaspace")}


@pytest.fixture
def fake_openai(monkeypatch):
    """Starts fake OpenAI-compatible endpoints on 127.0.0.1 (tests/fake_openai.py):
    ``fake_openai(answers, script=None, delay=0.0, refuse=None)`` returns a ``FakeOpenAI``
    whose ``url`` is the base URL; all are stopped after the test. The client in the test's
    process is kept from a proxy and from $OPENAI_BASE_URL."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    servers = []

    def start(answers, script=None, **options):
        servers.append(FakeOpenAI(answers, script, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
