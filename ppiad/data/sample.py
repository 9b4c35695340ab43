"""The one record every dataset produces: datasets are plain lists of these."""
from __future__ import annotations

from dataclasses import asdict, dataclass

NORMAL = "normal"
DEFECT = "defect"


@dataclass(frozen=True)
class Sample:
    path: str          # absolute image path
    category: str      # dataset category, e.g. "pill", "pcb1"
    object_name: str   # what the prompt calls it, e.g. "pill", "printed circuit board"
    label: str         # NORMAL or DEFECT
    defect_type: str   # "good" for normal images, else the defect type (folder name or "anomaly")
    split: str         # source split of the dataset: "train" or "test"

    @property
    def is_defect(self) -> bool:
        return self.label == DEFECT

    @property
    def answer(self) -> str:
        """The correct option letter: A = defect, B = normal."""
        return "A" if self.is_defect else "B"

    def to_dict(self) -> dict:
        return asdict(self)
