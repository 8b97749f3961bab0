"""OME-XML for exported label images: pixel size, and class names/colours as OME MapAnnotations.

QuPath, Fiji/Bio-Formats and OMERO read the physical pixel size; the class table is kept in two
``MapAnnotation`` elements (namespaces below), key = label value, so that it survives a trip through OMERO.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
NAMES_NS = "napari-uhrseg/class-names"
COLORS_NS = "napari-uhrseg/class-colors"
_OME_TYPES = {"uint8": "uint8", "uint16": "uint16", "uint32": "uint32"}


def label_ome_xml(shape, dtype, *, name="labels", class_names=None, class_colors=None, pixel_size=None,
                  pixel_unit=None) -> str:
    """OME-XML describing one 2-D label plane of ``shape`` (Y, X) in a TIFF, with the class table."""
    ny, nx = int(shape[0]), int(shape[1])
    physical = ""
    if pixel_size is not None:
        unit = pixel_unit or "µm"
        physical = (f' PhysicalSizeY="{float(pixel_size[0])!r}" PhysicalSizeYUnit={quoteattr(unit)}'
                    f' PhysicalSizeX="{float(pixel_size[1])!r}" PhysicalSizeXUnit={quoteattr(unit)}')
    annotations, refs = [], []
    for i, (ns, values) in enumerate(((NAMES_NS, class_names), (COLORS_NS, class_colors))):
        if not values:
            continue
        entries = "".join(
            f'<M K="{k}">{escape(v if isinstance(v, str) else _hex(v))}</M>' for k, v in enumerate(values)
        )
        annotations.append(f'<MapAnnotation ID="Annotation:{i}" Namespace="{ns}"><Value>{entries}</Value></MapAnnotation>')
        refs.append(f'<AnnotationRef ID="Annotation:{i}"/>')
    description = ""
    if class_names:
        description = f"<Description>{escape(json.dumps({'class_names': list(class_names)}))}</Description>"
    structured = f"<StructuredAnnotations>{''.join(annotations)}</StructuredAnnotations>" if annotations else ""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{OME_NS} {OME_NS}/ome.xsd" Creator="napari-uhrseg">'
        f'<Image ID="Image:0" Name={quoteattr(name)}>{description}'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="{_OME_TYPES[str(dtype)]}" SizeX="{nx}" SizeY="{ny}" '
        f'SizeC="1" SizeZ="1" SizeT="1"{physical}>'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="1" Name="labels"/>'
        f'<TiffData IFD="0" PlaneCount="1"/></Pixels>{"".join(refs)}</Image>{structured}</OME>'
    )
    # TIFF text tags must be 7-bit ASCII: non-ASCII (µm, class names) become XML character references.
    return xml.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _hex(rgb) -> str:
    r, g, b = (int(v) for v in list(rgb)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def read_class_metadata(xml: str | None) -> dict:
    """``{"class_names": [...], "class_colors": [[r, g, b], ...], "pixel_size": (y, x), "pixel_unit": str}``
    from OME-XML written by :func:`label_ome_xml` (missing entries are left out)."""
    info: dict = {}
    if not xml or "<OME" not in xml:
        return info
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return info
    ns = "{" + OME_NS + "}"
    for ann in root.iter(f"{ns}MapAnnotation"):
        pairs = {int(m.get("K")): (m.text or "") for m in ann.iter(f"{ns}M") if (m.get("K") or "").isdigit()}
        ordered = [pairs[k] for k in sorted(pairs)]
        if ann.get("Namespace") == NAMES_NS:
            info["class_names"] = ordered
        elif ann.get("Namespace") == COLORS_NS:
            info["class_colors"] = [[int(v[i:i + 2], 16) for i in (1, 3, 5)] for v in ordered]
    pixels = root.find(f".//{ns}Pixels")
    if pixels is not None and pixels.get("PhysicalSizeX"):
        info["pixel_size"] = (float(pixels.get("PhysicalSizeY")), float(pixels.get("PhysicalSizeX")))
        info["pixel_unit"] = pixels.get("PhysicalSizeXUnit", "µm")
    return info
