"""The PACS in the loop: cases from a DICOMweb server, the DICOM SEG and the report back to it.

GUI-free: ``kidseg pacs ...``, ``kidseg review URL``, ``kidseg draft URL`` and the Case worklist
widget all call this.

- :class:`Pacs` is one server, reached through its DICOMweb root (``dicomweb-client``): QIDO-RS
  finds series (:meth:`Pacs.find`), WADO-RS fetches them (:meth:`Pacs.fetch`, into a temporary
  folder renamed into place when every instance is in: a fetch that dies leaves nothing that
  looks complete), STOW-RS stores results (:meth:`Pacs.store`), or DIMSE C-STORE (``pynetdicom``)
  where the settings name a DICOM node.
- Credentials never come from the command line: ``KIDSEG_PACS_USER`` / ``KIDSEG_PACS_PASSWORD``,
  or a settings file readable by its owner only (``KIDSEG_PACS_CONFIG``, default
  ``~/.config/napari-kidseg/pacs.json``; refused otherwise). A URL carrying a user or password is
  refused. HTTPS verifies certificates (``ca_bundle`` / ``KIDSEG_PACS_CA_BUNDLE`` names a CA);
  there is no fallback to an unverified connection.
- Every fault a user meets (wrong password, unreachable server, timeout, a refused store, a
  series gone between find and fetch, an answer that is not DICOM) is one :class:`KidsegError`
  line naming the server, without credentials.
- :class:`PacsWorklist` is a :class:`~napari_kidseg.worklist.Worklist` on the series a query
  finds: each is fetched into the state folder ahead of the reviewer (:meth:`PacsWorklist.prefetch`,
  in a background thread, with progress), and Mark reviewed sends the case's DICOM SEG and its
  report as an Encapsulated PDF through an outbox (``outbox/`` in the state folder): a failed send
  stays there, the row says ``not sent: reason``, and it is retried on the next start and on
  request. Every send is a new series on the server; nothing there is replaced.

Why an Encapsulated PDF and not a DICOM SR for the report: the report the tool writes is a
one-page PDF (figure, table, method notes) and every PACS viewer shows an Encapsulated PDF as the
page the radiologist saw; an SR (TID 1500) renders as a bare tree of coded values in most viewers,
and the structured content it would add (the segments, their volumes) is already in the DICOM SEG
sent beside it, which any consumer can measure.

The package: ``settings`` (how to reach a server), ``client`` (:class:`Pacs`, one server),
``outbox`` (the Encapsulated PDF and the outbox), ``worklist`` (:class:`PacsWorklist`, :class:`Query`,
:func:`open_worklist`). The names below are its public face.
"""

from .client import Pacs, SeriesInfo
from .outbox import Outbox, encapsulated_pdf
from .settings import ENV_CA_BUNDLE, ENV_CONFIG, ENV_PASSWORD, ENV_USER, Settings, load_settings, settings_path
from .worklist import SERIES_FOLDER, PacsWorklist, Query, is_pacs_url, open_worklist

__all__ = [
    "ENV_CA_BUNDLE",
    "ENV_CONFIG",
    "ENV_PASSWORD",
    "ENV_USER",
    "SERIES_FOLDER",
    "Outbox",
    "Pacs",
    "PacsWorklist",
    "Query",
    "SeriesInfo",
    "Settings",
    "encapsulated_pdf",
    "is_pacs_url",
    "load_settings",
    "open_worklist",
    "settings_path",
]
