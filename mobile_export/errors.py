"""Exceptions raised by mobile_export: export failures and refused model bundles."""

from __future__ import annotations


class MobileExportError(Exception):
    """Base class of every mobile_export error."""


class ExportError(MobileExportError):
    """The model could not be exported to ONNX or converted to .ort as required."""


class BundleError(MobileExportError):
    """A model bundle was refused; nothing from it was loaded."""


class BundleFormatError(BundleError):
    """The bundle container or its manifest is malformed, truncated or unsupported."""


class BundleSignatureError(BundleError):
    """The bundle is unsigned, or its signature does not verify under the trusted key."""


class BundleIntegrityError(BundleError):
    """The model bytes do not match the sha256/size in the signed manifest."""


class BundleRollbackError(BundleError):
    """The bundle is validly signed but older than one the device already accepted."""


class BundleSchemaError(BundleError):
    """The model's inputs/outputs disagree with the schema in the signed manifest."""


class ForecastInputError(ValueError, MobileExportError):
    """A forecast query has inputs of the wrong shape, type or range."""
