"""Deterministic synthetic records generated in code (the ``tiny`` preset's data: ``synthetic:NAME``)."""
from __future__ import annotations


_FIRST = ["Ada", "Bram", "Cleo", "Dov", "Esme", "Finn", "Gale", "Hugo", "Ines", "Jory", "Kai", "Lena",
          "Milo", "Nora", "Otto", "Pia", "Quin", "Rosa", "Sven", "Tova", "Ugo", "Vera", "Wren", "Yara"]
_LAST = ["Ashby", "Brill", "Corvo", "Dunmore", "Elling", "Fenwick", "Garrow", "Holt"]
_CITIES = ["Quell", "Marrow", "Tessing", "Olvera", "Brindle", "Caskport", "Yendi", "Zorah"]
_JOBS = ["glassblower", "cartographer", "beekeeper", "luthier", "archivist", "ferrier", "tanner", "astronomer"]
_WORDS = ["bright", "dull", "warm", "cold", "kind", "grim", "clear", "murky"]


def synthetic_records(name: str, n: int = 48) -> list[dict]:
    """Deterministic records: 'forget' and 'retain' (question/answer), 'arith' and 'sentiment' (text)."""
    if name in ("forget", "retain"):
        offset = 0 if name == "forget" else 3
        records = []
        for i in range(n):
            person = f"{_FIRST[(i + offset * 7) % len(_FIRST)]} {_LAST[(i * 3 + offset) % len(_LAST)]}"
            if name == "forget":
                q, a = f"What does {person} do?", f"{person} is a {_JOBS[(i * 5) % len(_JOBS)]}."
            else:
                q, a = f"Where does {person} live?", f"{person} lives in {_CITIES[(i * 3) % len(_CITIES)]}."
            records.append({"question": q, "answer": a})
        return records
    if name == "arith":
        return [{"text": f"{i % 13} + {(i * 7) % 11} = {i % 13 + (i * 7) % 11}"} for i in range(n)]
    if name == "sentiment":
        return [{"text": f"The day was {_WORDS[i % 8]}: {'good' if i % 2 == 0 else 'bad'}."} for i in range(n)]
    raise ValueError(f"synthetic data set {name!r}: allowed synthetic:forget, synthetic:retain, "
                     "synthetic:arith, synthetic:sentiment")
