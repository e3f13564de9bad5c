"""Infobip SMTP API endpoints per region, with the ports each one offers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    label: str
    host: str
    ports: tuple[int, ...]
    aliases: tuple[str, ...] = ()


# From Infobip's SMTP API page. Saudi Arabia appears as -sa3 now and -sa2 in older copies:
# `upstream.host` overrides the host for such cases and for white-labelled endpoints.
REGIONS: tuple[Region, ...] = (
    Region("europe", "Europe", "smtp-api.infobip.com", (587, 465), ("eu-default", "default")),
    Region(
        "europe-schrems", "Europe (Schrems II)", "smtp-api-eu.infobip.com", (587, 465),
        ("eu", "schrems", "schrems-ii", "schrems2"),
    ),
    Region(
        "great-britain", "Great Britain", "smtp-api-gb1.infobip.com", (587, 465),
        ("gb", "uk", "united-kingdom", "britain"),
    ),
    Region("india", "India (Mumbai)", "smtp-api-mum.infobip.com", (587, 465), ("in", "mumbai")),
    Region("indonesia", "Indonesia", "smtp-api-id.infobip.com", (587, 465), ("id",)),
    Region("mena", "MENA", "smtp-api-ae2.infobip.com", (587,), ("ae", "uae")),
    Region("pakistan", "Pakistan", "smtp-api-pk2.infobip.com", (587,), ("pk",)),
    Region("qatar", "Qatar", "smtp-api-qa1.infobip.com", (587,), ("qa",)),
    Region("saudi-arabia", "Saudi Arabia", "smtp-api-sa3.infobip.com", (587,), ("sa", "ksa")),
    Region("turkiye", "Türkiye", "smtp-api-tr1.infobip.com", (587,), ("tr", "turkey")),
    Region("us", "US", "smtp-api-us.infobip.com", (587, 465), ("usa", "united-states")),
)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-").replace("ü", "u")


_BY_NAME: dict[str, Region] = {}
for _region in REGIONS:
    for _key in (_region.name, _region.label, *_region.aliases):
        _BY_NAME[_normalise(_key)] = _region


def find_region(name: str) -> Region | None:
    """Return the region for a name or alias (case-insensitive), or None."""
    return _BY_NAME.get(_normalise(name))


def region_names() -> list[str]:
    return [region.name for region in REGIONS]


def format_region_table() -> str:
    """The table printed by `infobip-relay regions`."""
    rows = [("NAME", "REGION", "HOST", "PORTS", "ALIASES")]
    for region in REGIONS:
        rows.append(
            (
                region.name,
                region.label,
                region.host,
                ", ".join(str(port) for port in region.ports),
                ", ".join(region.aliases),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
