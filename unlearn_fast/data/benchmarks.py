"""TOFU, MUSE and WMDP data in the benchmarks' own record shapes, read from local files only.

Record shapes (the field names of the public datasets):

- TOFU (``locuslab/TOFU``): QA ``{"question", "answer"}``; the ``*_perturbed``
  configurations add ``"paraphrased_answer"`` (str) and ``"perturbed_answer"``
  (list of str: plausible wrong answers, perturbations of the paraphrase).
  Splits used by the evaluation: ``forget10_perturbed`` (forget), ``retain_perturbed``,
  ``holdout10`` (QA never trained on: membership inference), ``real_authors_perturbed``
  and ``world_facts_perturbed`` (question, answer, perturbed_answer).
- MUSE (``muse-bench/MUSE-News`` / ``-Books``): ``knowmem`` QA ``{"question", "answer"}``
  (splits forget_qa, retain_qa), ``verbmem`` ``{"prompt", "gt"}`` (forget), raw text
  ``{"text"}`` (``raw``: forget, retain1, retain2, holdout; ``privleak``: forget, retain, holdout).
- WMDP (``cais/wmdp``, ``cais/wmdp-corpora``): multiple-choice ``{"question", "choices",
  "answer"}`` (answer = index into choices; wmdp-bio, wmdp-chem, wmdp-cyber, and MMLU in the
  same shape) and forget/retain corpora ``{"text"}``.

A benchmark directory holds one file per split, named by the split (``forget_perturbed``,
``knowmem/forget_qa``, ``wmdp-bio``, ...; see ``LAYOUT``), as JSON lines, a JSON list, or
parquet (parquet needs pyarrow). A file may also carry the public dataset's own name
(``forget10_perturbed.json``) or be a shard of a Hugging Face export (``forget_qa-00000-of-00001.parquet``).
``hf_records`` reads a split from the local Hugging Face ``datasets`` cache (offline: no download).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = (".jsonl", ".json", ".parquet")

# benchmark -> role -> candidate file stems, the first found is read; roles marked optional may be absent
LAYOUT = {
    "tofu": {
        "forget": ["forget_perturbed", "forget10_perturbed", "forget05_perturbed", "forget01_perturbed"],
        "retain": ["retain_perturbed"],
        "holdout": ["holdout", "holdout10", "holdout05", "holdout01"],
        "real_authors": ["real_authors_perturbed"],
        "world_facts": ["world_facts_perturbed"],
    },
    "muse": {
        "forget_knowmem": ["knowmem/forget_qa", "knowmem_forget_qa"],
        "retain_knowmem": ["knowmem/retain_qa", "knowmem_retain_qa"],
        "verbmem": ["verbmem/forget", "verbmem_forget"],
        "forget_text": ["privleak/forget", "privleak_forget", "raw/forget", "raw_forget"],
        "holdout_text": ["privleak/holdout", "privleak_holdout", "raw/holdout", "raw_holdout"],
        "retain_text": ["privleak/retain", "privleak_retain", "raw/retain1", "raw_retain1"],
    },
    "wmdp": {
        "forget_corpus": ["forget-corpus", "bio-forget-corpus", "cyber-forget-corpus"],
        "retain_corpus": ["retain-corpus", "bio-retain-corpus", "cyber-retain-corpus"],
    },
}
OPTIONAL = {"tofu": {"holdout", "real_authors", "world_facts"},
            "muse": {"retain_knowmem", "verbmem", "retain_text"},
            "wmdp": {"forget_corpus", "retain_corpus"}}
WMDP_QUESTION_SETS = ("wmdp-bio", "wmdp-chem", "wmdp-cyber", "mmlu")

QA_KEYS = ("question", "answer")
TOFU_PERTURBED_KEYS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
TOFU_OPTIONS_KEYS = ("question", "answer", "perturbed_answer")
VERBMEM_KEYS = ("prompt", "gt")
TEXT_KEYS = ("text",)
CHOICE_KEYS = ("question", "choices", "answer")


# ---------------------------------------------------------------- reading files
def read_records(path) -> list[dict]:
    """Records of one file: JSON lines (``.jsonl``, or ``.json`` holding lines), a JSON list, or parquet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
        return pq.read_table(path).to_pylist()
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:  # JSON lines (TOFU's .json files are JSON lines)
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: every record must be a JSON object")
    return records


def find_split(directory, stems) -> Path | None:
    """The first file of ``directory`` named by one of ``stems`` (any of EXTENSIONS, or a ``-00000-of-N`` shard)."""
    directory = Path(directory)
    for stem in stems:
        for ext in EXTENSIONS:
            candidate = directory / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
        parent, name = (directory / stem).parent, Path(stem).name
        if parent.is_dir():
            shards = sorted(p for p in parent.glob(f"{name}-*-of-*") if p.suffix in EXTENSIONS)
            if len(shards) > 1:
                raise ValueError(f"{parent}: split {name!r} has {len(shards)} shards; join them into one file")
            if shards:
                return shards[0]
    return None


@contextlib.contextmanager
def hugging_face_offline():
    """Switch the hub and datasets libraries to offline mode for a block (they read the
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE variables once, at import): what is not cached fails at
    once instead of trying the network."""
    import huggingface_hub.constants as hub

    switches = [(hub, "HF_HUB_OFFLINE")]
    try:
        import datasets

        switches += [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    except ImportError:
        pass
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in switches if hasattr(obj, attr)]
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    for obj, attr, _ in saved:
        setattr(obj, attr, True)
    os.environ.update({k: "1" for k in env})
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hf_records(path: str, name: str | None, split: str) -> list[dict]:
    """A split from the local Hugging Face ``datasets`` cache (or a local dataset folder), offline."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("reading from the Hugging Face cache needs the 'datasets' package") from exc
    with hugging_face_offline():
        try:
            return datasets.load_dataset(path, name, split=split).to_list()
        except Exception as exc:  # the library raises several kinds when the cache lacks the split
            raise FileNotFoundError(f"{path} ({name}, split {split}) is not in the local Hugging Face datasets "
                                    f"cache ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------- validation
def check_records(records, keys, where: str) -> list[dict]:
    """``records`` if every one has ``keys`` with usable values; ValueError naming ``where`` and the record."""
    if not records:
        raise ValueError(f"{where}: no records")
    for i, rec in enumerate(records):
        missing = [k for k in keys if k not in rec or rec[k] is None]
        if missing:
            raise ValueError(f"{where}: record {i} lacks {missing} (has {sorted(rec)})")
        for k in keys:
            value = rec[k]
            if k in ("perturbed_answer", "choices"):
                if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                        or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{where}: record {i}: {k!r} must be a non-empty list of strings, got {value!r}")
            elif k == "answer" and "choices" in keys:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(rec["choices"]):
                    raise ValueError(f"{where}: record {i}: 'answer' must be an index into its "
                                     f"{len(rec['choices'])} choices, got {value!r}")
            elif not isinstance(value, str):
                raise ValueError(f"{where}: record {i}: {k!r} must be a string, got {type(value).__name__}")
    return list(records)


# ---------------------------------------------------------------- the three benchmarks
@dataclass
class TofuData:
    forget: list[dict]  # question, answer, paraphrased_answer, perturbed_answer
    retain: list[dict]  # same shape
    holdout: list[dict] | None = None  # question, answer
    real_authors: list[dict] | None = None  # question, answer, perturbed_answer
    world_facts: list[dict] | None = None


@dataclass
class MuseData:
    forget_knowmem: list[dict]  # question, answer
    forget_text: list[dict]  # text (privleak forget)
    holdout_text: list[dict]  # text (privleak holdout)
    retain_knowmem: list[dict] | None = None
    verbmem: list[dict] | None = None  # prompt, gt
    retain_text: list[dict] | None = None


@dataclass
class WmdpData:
    questions: dict[str, list[dict]]  # question set name (file stem) -> question, choices, answer
    forget_corpus: list[dict] | None = None  # text
    retain_corpus: list[dict] | None = None


_ROLE_KEYS = {
    "tofu": {"forget": TOFU_PERTURBED_KEYS, "retain": TOFU_PERTURBED_KEYS, "holdout": QA_KEYS,
             "real_authors": TOFU_OPTIONS_KEYS, "world_facts": TOFU_OPTIONS_KEYS},
    "muse": {"forget_knowmem": QA_KEYS, "retain_knowmem": QA_KEYS, "verbmem": VERBMEM_KEYS,
             "forget_text": TEXT_KEYS, "holdout_text": TEXT_KEYS, "retain_text": TEXT_KEYS},
    "wmdp": {"forget_corpus": TEXT_KEYS, "retain_corpus": TEXT_KEYS},
}


def read_meta(directory) -> dict:
    """``meta.json`` of a benchmark directory (written by ``export_benchmark``), or {}."""
    path = Path(directory) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_benchmark(name: str, directory):
    """TofuData | MuseData | WmdpData from the files of ``directory`` (layout: ``LAYOUT``)."""
    if name not in LAYOUT:
        raise ValueError(f"name must be one of {sorted(LAYOUT)}, got {name!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"benchmark directory {directory} does not exist")
    found = {}
    for role, stems in LAYOUT[name].items():
        path = find_split(directory, stems)
        if path is None:
            if role not in OPTIONAL[name]:
                raise FileNotFoundError(f"{directory}: no {name} {role!r} split (looked for {stems} with "
                                        f"{'/'.join(EXTENSIONS)})")
            continue
        found[role] = check_records(read_records(path), _ROLE_KEYS[name][role], str(path))
    if name == "tofu":
        return TofuData(**found)
    if name == "muse":
        return MuseData(**found)
    questions = {}
    for stem in WMDP_QUESTION_SETS:
        path = find_split(directory, [stem, f"{stem}/test"])
        if path is not None:
            questions[stem] = check_records(read_records(path), CHOICE_KEYS, str(path))
    if not questions:
        raise FileNotFoundError(f"{directory}: no multiple-choice questions (looked for {list(WMDP_QUESTION_SETS)})")
    return WmdpData(questions, **found)


def write_jsonl(records, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
