"""MR series whose headers stand for the acquisition types a header-based classifier tells apart.

:func:`tests.data.make_series.write_mr_series` writes a T1 spin-echo head phantom. The helpers here
rewrite its acquisition parameters (TE, TR, TI, flip angle, Scanning Sequence, Sequence Variant, Image
Type, pixel bandwidth, b-value and diffusion gradient in standard or vendor-private elements) so that
each series looks like a typical clinical T1w, T2w, FLAIR, T2*w or diffusion series, or like one of the
awkward headers a classifier has to survive. The pixels stay the phantom's: only headers matter here.
Nothing is random, so the same call writes the same files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.data.make_series import write_mr_series

__all__ = ["ACQUISITIONS", "Acquisition", "PrivateValue", "write_acquisition"]


@dataclass(frozen=True)
class PrivateValue:
    """A vendor-private element: ``(group, xx00 + offset)`` in the block reserved by ``creator``."""

    group: int
    creator: str
    offset: int
    vr: str
    value: object


@dataclass(frozen=True)
class Acquisition:
    """Header values of one kind of series.

    Attributes
    ----------
    attributes
        Keyword -> value set on every image (``None`` writes an empty element).
    delete
        Keywords removed from every image.
    private
        Vendor-private elements set on every image.
    volumes
        Per-volume keyword -> value overrides; more than one writes a multi-volume series whose
        volumes share the slice positions (as DWI b-values do), acquired one after the other.
    """

    attributes: Mapping[str, object] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    private: tuple[PrivateValue, ...] = ()
    volumes: tuple[Mapping[str, object], ...] = ({},)


_SIEMENS = {"Manufacturer": "SIEMENS", "ImagingFrequency": "123.25", "MagneticFieldStrength": "3"}
_DIFFUSION = {"ScanningSequence": "EP", "SequenceVariant": ["SK", "SP"], "RepetitionTime": "5000", "EchoTime": "89"}
_DERIVED = {"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION"], **_DIFFUSION, "PixelBandwidth": "1500"}

#: Series types by name; the first five are the classic structural contrasts.
ACQUISITIONS: dict[str, Acquisition] = {
    "T1w_SE": Acquisition({"PixelBandwidth": "130", "Manufacturer": "SIEMENS"}),
    "T1w_MPRAGE": Acquisition(
        {
            **_SIEMENS,
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": "2300",
            "EchoTime": "2.98",
            "InversionTime": "900",
            "FlipAngle": "9",
            "PixelBandwidth": "240",
            "SAR": "0.0512",
            "dBdt": "0",
        }
    ),
    "T2w_TSE": Acquisition(
        {
            **_SIEMENS,
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP"],
            "RepetitionTime": "4000",
            "EchoTime": "100",
            "FlipAngle": "150",
            "EchoTrainLength": 16,
            "PixelBandwidth": "200",
        }
    ),
    "FLAIR": Acquisition(
        {
            **_SIEMENS,
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "RepetitionTime": "9000",
            "EchoTime": "120",
            "InversionTime": "2500",
            "FlipAngle": "150",
            "EchoTrainLength": 16,
            "PixelBandwidth": "250",
        }
    ),
    "T2starw_GRE": Acquisition(
        {"ScanningSequence": "GR", "SequenceVariant": "SP", "RepetitionTime": "600", "EchoTime": "20"}
        | {"FlipAngle": "20", "PixelBandwidth": "100", "Manufacturer": "SIEMENS"}
    ),
    "DWI": Acquisition(  # b=0 and b=1000 volumes in one series, b-value in the standard element
        {**_SIEMENS, **_DIFFUSION, "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], "PixelBandwidth": "1500"},
        volumes=({"DiffusionBValue": 0.0}, {"DiffusionBValue": 1000.0}),
    ),
    "DWI_trace": Acquisition(  # b-value in Siemens' private element
        {**_SIEMENS, **_DERIVED, "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]},
        private=(PrivateValue(0x0019, "SIEMENS MR HEADER", 0x0C, "IS", "1000"),),
    ),
    "ADC": Acquisition(  # derived maps may lack TE and TR
        {**_SIEMENS, **_DERIVED, "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]},
        delete=("EchoTime", "RepetitionTime"),
    ),
    "FA": Acquisition({**_SIEMENS, **_DERIVED, "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "FA"]}),
    "eADC": Acquisition({**_SIEMENS, **_DERIVED, "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "EADC"]}),
    "DWI_GE": Acquisition(  # GE: b-value as the first of four IS values, gradient direction in GEMS_ACQU_01
        {**_DIFFUSION, "Manufacturer": "GE MEDICAL SYSTEMS", "PixelBandwidth": "1953.12", "NumberOfAverages": "2"},
        private=(
            PrivateValue(0x0043, "GEMS_PARM_01", 0x39, "IS", ["1000001000", "8", "0", "0"]),
            PrivateValue(0x0019, "GEMS_ACQU_01", 0xE0, "DS", ["0.0", "0.6", "0.8"]),
        ),
    ),
    "unknown_sequence": Acquisition(  # "se" in "UnknownScanningSequence" sets ScanningSequence_SE
        {"PixelBandwidth": "130"}, delete=("ScanningSequence", "SequenceVariant", "Manufacturer", "ImageType")
    ),
    "Dixon_fat": Acquisition(  # "fa" in "FAT" sets ImageType_FA
        {"ImageType": ["DERIVED", "PRIMARY", "DIXON", "FAT"], "ScanningSequence": "GR", "SequenceVariant": "SP"}
        | {"RepetitionTime": "6.6", "EchoTime": "2.4", "FlipAngle": "10", "PixelBandwidth": "500"}
    ),
    "empty_values": Acquisition(  # empty TE, malformed optional values
        {"PixelBandwidth": "130", "EchoTime": None, "EchoTrainLength": None, "InversionTime": None, "SAR": None}
    ),
    "no_pixel_bandwidth": Acquisition(delete=("PixelBandwidth",)),
}


def write_acquisition(
    folder: Path,
    name: str,
    *,
    series_number: int,
    slices: int = 3,
    size: int = 16,
    study_uid: str | None = None,
) -> list[Path]:
    """Write series ``name`` of :data:`ACQUISITIONS` under ``folder/name`` and return its files.

    Volume ``v`` goes to the subfolder ``vNN`` with Instance Numbers continuing from the previous
    volume and an Acquisition Time one minute later.
    """
    acquisition = ACQUISITIONS[name]
    study = study_uid or generate_uid(entropy_srcs=["infergate-tests-mr-sequences", "study"])
    series = generate_uid(entropy_srcs=["infergate-tests-mr-sequences", name, str(series_number)])
    paths: list[Path] = []
    for volume, overrides in enumerate(acquisition.volumes):
        info = write_mr_series(
            folder / name / f"v{volume:02d}",
            slices=slices,
            size=size,
            study_uid=study,
            series_uid=series,
            series_number=series_number,
            series_description=name,
            seed=1000 * series_number + volume,
        )
        for index, path in enumerate(info.paths):
            ds = dcmread(path)
            for keyword, value in {**acquisition.attributes, **overrides}.items():
                setattr(ds, keyword, value)
            for keyword in acquisition.delete:
                if keyword in ds:
                    delattr(ds, keyword)
            for item in acquisition.private:
                ds.private_block(item.group, item.creator, create=True).add_new(item.offset, item.vr, item.value)
            ds.InstanceNumber = volume * slices + index + 1
            ds.AcquisitionTime = f"1017{30 + volume:02d}"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
