"""Client protocols as thin adapters over the one request path (`edge.py`): each only translates.

`immich` (Immich's `/predict`, `/ping`, `/`), `fork_ocr` (the OCR fork's request shape on that `/predict`),
`mt_photos` (the MT-Photos AI API) and `status` (`/info`, `/metrics`) never import one another; `app.py` puts
them together. `mt_ocr` is mt-photos-ai's OCR convention, shared by the two clients built for it.
"""
