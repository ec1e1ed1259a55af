"""Which images a model speaks for, from their DICOM header: chest radiographs only.

A model fitted on chest radiographs knows nothing about an ultrasound frame, a CT slice or a
hand film, even when their spectrum happens to look typical. Where an image carries a header,
:class:`ScopeRules` checks three of its fields against allow-lists stored in the model:

- (0008,0060) Modality: a projection radiograph (CR, DX...), not US, CT, MR, NM...;
- (0018,0015) Body Part Examined: the chest;
- (0018,5101) View Position: a view a chest film is taken in.

Each list is the built-in default (:data:`RADIOGRAPH_MODALITIES`, :data:`CHEST_BODY_PARTS`,
:data:`CHEST_VIEW_POSITIONS`) plus every value the fit set's headers carried, so a site's own
spelling (e.g. ``PORT CHEST``) is in scope once it is in the fit set. Either can be replaced
at fit time (``cxr-monitor fit --scope-modalities ...``) or when serving
(``--scope-modalities``, ``CXR_MONITOR_SCOPE_MODALITIES``); ``*`` accepts any value. An image
without the field (PNG, JPEG, arrays, or an empty DICOM element) is not judged on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidInputError
from .types import ImageMeta

__all__ = [
    "ANY",
    "CHEST_BODY_PARTS",
    "CHEST_VIEW_POSITIONS",
    "RADIOGRAPH_MODALITIES",
    "SCOPE_FIELDS",
    "ScopeRules",
    "parse_allow_list",
]

RADIOGRAPH_MODALITIES: tuple[str, ...] = ("CR", "DR", "DX", "RG")
"""Computed and digital radiography, and the retired DR and RG codes some systems still write."""

CHEST_BODY_PARTS: tuple[str, ...] = ("CHEST", "LUNG", "THORAX")
"""The DICOM defined term CHEST, and the synonyms vendors write."""

CHEST_VIEW_POSITIONS: tuple[str, ...] = ("AP", "LAT", "LATERAL", "LL", "LLD", "LLO", "PA", "RL", "RLD", "RLO")
"""The DICOM defined terms of (0018,5101) for projection radiographs, and LATERAL spelt out."""

SCOPE_FIELDS: tuple[str, ...] = ("modality", "body_part", "view_position")
"""The header fields checked, in the order reasons are given (the metric label values)."""

ANY = "*"
"""In an allow-list given as text: accept any value of the field."""

_TAGS = {
    "modality": ("(0008,0060) Modality", "a projection radiograph modality"),
    "body_part": ("(0018,0015) Body Part Examined", "the chest"),
    "view_position": ("(0018,5101) View Position", "a chest radiograph view"),
}
_META = {"modality": "modality", "body_part": "body_part_examined", "view_position": "view_position"}
_RECORD = {k: "img_" + v for k, v in _META.items()}  # fit records keep image metadata with this prefix


def _norm(value: Any) -> str:
    return " ".join(str(value).upper().split())


def parse_allow_list(text: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """An allow-list from ``"CR,DX"`` (or an iterable of values); ``"*"`` means any value.

    Returns
    -------
    tuple of str, or None
        Upper-case values, sorted and unique; ``None`` for any value.

    Raises
    ------
    InvalidInputError
        An empty list.
    """
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    values = sorted({_norm(v) for v in items if _norm(v)})
    if ANY in values:
        return None
    if not values:
        raise InvalidInputError(f"an allow-list needs at least one value, or {ANY!r} for any, got {text!r}")
    return tuple(values)


@dataclass(frozen=True)
class ScopeRules:
    """Allow-lists of header values; ``None`` accepts any value of that field.

    Parameters
    ----------
    modalities, body_parts, view_positions : tuple of str or None
        Upper-case allowed values.
    """

    modalities: tuple[str, ...] | None = RADIOGRAPH_MODALITIES
    body_parts: tuple[str, ...] | None = CHEST_BODY_PARTS
    view_positions: tuple[str, ...] | None = CHEST_VIEW_POSITIONS

    @classmethod
    def learn(cls, records: Iterable[Mapping[str, Any]] | None) -> ScopeRules:
        """The defaults plus every value the fit set's headers carried.

        Parameters
        ----------
        records : iterable of dict
            Fit records, whose ``img_modality``, ``img_body_part_examined`` and
            ``img_view_position`` hold the header values (absent for non-DICOM images).
        """
        seen: dict[str, set[str]] = {f: set() for f in SCOPE_FIELDS}
        for record in records or ():
            for f in SCOPE_FIELDS:
                value = record.get(_RECORD[f])
                if value not in (None, "") and _norm(value):
                    seen[f].add(_norm(value))
        base = cls()
        return cls(
            **{
                _attr(f): tuple(sorted(set(getattr(base, _attr(f))) | seen[f]))  # type: ignore[arg-type]
                for f in SCOPE_FIELDS
            }
        )

    def union(self, other: ScopeRules) -> ScopeRules:
        """Rules accepting what either accepts (``None``, any value, wins): learned rules of two
        parts of a fit set merge into those of the whole."""
        merged = {}
        for f in SCOPE_FIELDS:
            a, b = getattr(self, _attr(f)), getattr(other, _attr(f))
            merged[_attr(f)] = None if a is None or b is None else tuple(sorted(set(a) | set(b)))
        return ScopeRules(**merged)  # type: ignore[arg-type]

    def with_overrides(
        self,
        *,
        modalities: str | Iterable[str] | None = None,
        body_parts: str | Iterable[str] | None = None,
        view_positions: str | Iterable[str] | None = None,
    ) -> ScopeRules:
        """These rules with the given lists replaced (``None`` keeps a list, ``"*"`` accepts any)."""
        given = {"modalities": modalities, "body_parts": body_parts, "view_positions": view_positions}
        return replace(self, **{k: parse_allow_list(v) for k, v in given.items() if v is not None})

    def check(self, meta: ImageMeta) -> tuple[tuple[str, str], ...]:
        """Why an image is out of scope: ``(field, reason)`` pairs; empty when in scope.

        ``field`` is one of :data:`SCOPE_FIELDS`; fields absent from the header are not judged.
        """
        out = []
        for f in SCOPE_FIELDS:
            allowed = getattr(self, _attr(f))
            value = getattr(meta, _META[f])
            if allowed is None or value is None or not _norm(value):
                continue
            if _norm(value) not in allowed:
                tag, what = _TAGS[f]
                out.append(
                    (f, f"{tag} {value!r} is not {what} this model covers (allowed: {', '.join(allowed)})")
                )
        return tuple(out)

    def to_json(self) -> dict[str, list[str] | None]:
        return {_attr(f): _listed(getattr(self, _attr(f))) for f in SCOPE_FIELDS}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> ScopeRules:
        """Rules saved by :meth:`to_json`; a model saved before scopes existed gets the defaults."""
        if doc is None:
            return cls()
        return cls(**{k: None if v is None else parse_allow_list(v) for k, v in doc.items()})


def _attr(field: str) -> str:
    return {"modality": "modalities", "body_part": "body_parts", "view_position": "view_positions"}[field]


def _listed(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)
