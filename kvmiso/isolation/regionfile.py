"""Region files: the RFC's default set changed by a TOML file, or a shipped set by name::

    drop = ["buses", "memslots"]   # default regions to leave out

    [[region]]                     # extra regions: layout regions by name (``bus:*`` for all) ...
    name = "emulate_ctxt"
    cite = "why it is needed"

    [[region]]                     # ... or an explicit range
    name = "vmemmap_slice"
    start = 0xffffea0000000000
    size = 0x200000
    level = "PMD"

Every error names the file and line. Region files change the RFC's copies (``rfc-v1``); the ASI
policies map what their series marks (``asi-2022``) or everything it does not (``asi``) and take none.
"""

from __future__ import annotations

from pathlib import Path

from ..observe.kernel.kobject import known_object
from .layout import Layout
from .mapset import LEVELS, KvmAddressSpace, MapSetError, RegionSpec, default_specs
from .framestore import PageTableError
from .pagetable import LEVEL_SPAN, canonical
from .policy import POLICIES
from .tomlfile import TomlFileError, line_of, load_toml

SETS_DIR = Path(__file__).parent / "sets"


def shipped_sets() -> list[str]:
    """Region sets that ship with kvmiso, usable by name (``--regions modern``)."""
    return sorted(p.stem for p in SETS_DIR.glob("*.toml"))


def resolve_region_file(name: str | Path) -> Path:
    """A shipped set's file by name, or the path as given; a name that is neither is an error."""
    path = Path(name)
    if path.suffix != ".toml" and (SETS_DIR / f"{path}.toml").is_file():
        return SETS_DIR / f"{path}.toml"
    if not path.exists():
        raise MapSetError(f"no region file {str(name)!r}: not a path, and kvmiso ships the sets "
                          f"{', '.join(shipped_sets())}")
    return path


def load_regions(name: str | Path, layout: Layout, policy: str = "rfc-v1", drop: tuple[str, ...] = (),
                 ram: int = 1 << 30) -> KvmAddressSpace:
    """The default set changed by the region file ``name`` (see the module docstring)."""
    if POLICIES[policy].builds != "kvm_mm":
        raise MapSetError(f"policy {policy} maps what its series marks: region files change the RFC's kvm_mm copies "
                          f"only (rfc-v1)")
    path = resolve_region_file(name)
    try:
        doc, text = load_toml(path, "region file")
    except TomlFileError as e:
        raise MapSetError(str(e)) from None

    def fail(msg: str, needle: str) -> MapSetError:
        return MapSetError(msg, line_of(text, needle), str(path))

    known = {"drop", "region"}
    for k in doc:
        if k not in known:
            raise fail(f"unknown key {k!r}; the file may set {', '.join(sorted(known))}", k)
    names = {s.name for s in default_specs(layout)}
    dropped = list(drop) + list(doc.get("drop", []))
    for d in dropped:
        if d not in names:
            raise fail(f"cannot drop unknown region {d!r}; the default set has {', '.join(sorted(names))}", f'"{d}"')
    kas = KvmAddressSpace.default(layout, policy, tuple(dropped), ram)
    for entry in doc.get("region", []):
        _add(kas, layout, entry, fail, path)
    return kas


def _add(kas: KvmAddressSpace, layout: Layout, entry: dict, fail, path: Path) -> None:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise fail("a [[region]] needs a name", "[[region]]")
    needle = f'"{name}"'
    level = str(entry.get("level", "PTE")).upper()
    if level not in LEVELS:
        raise fail(f"region {name!r}: unknown level {entry.get('level')!r}; one of {', '.join(LEVELS)}", needle)
    if "start" in entry:
        start, size = entry["start"], entry.get("size", 0)
        if not isinstance(start, int) or not isinstance(size, int) or size <= 0:
            raise fail(f"region {name!r}: start and size must be integers, size > 0", needle)
        ranges = [(start, start + size)]
        span = LEVEL_SPAN[LEVELS[level]]
        if start % span or size % span:
            raise fail(f"region {name!r}: level {level} cannot hold [{start:#x}, {start + size:#x}) "
                       f"(both ends must be multiples of {span:#x})", needle)
    else:
        regions = layout.matching(name)
        if not regions:
            if known_object(name):
                # an object this VM does not have (lapic without an in-kernel LAPIC): noted, not fatal
                kas.missing.append(name)
                return
            raise fail(f"unknown region {name!r}: not in the layout ({', '.join(layout.regions)}) and no start/size",
                       needle)
        ranges = [r for reg in regions for r in reg.ranges]
    for s, e in ranges:
        if not canonical(s) or not canonical(e - 1) or (s >> 63) != ((e - 1) >> 63):
            raise fail(f"region {name!r}: [{s:#x}, {e:#x}) is not canonical", needle)
    try:
        kas.add_region(RegionSpec(name, "user-added", level, entry.get("cite", str(path))), ranges)
    except (MapSetError, PageTableError) as e:
        raise fail(f"region {name!r}: {e}", needle) from None


__all__ = ["SETS_DIR", "load_regions", "resolve_region_file", "shipped_sets"]
