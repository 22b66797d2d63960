"""crossalign: align images and text in one embedding space, in batch.

Stages (each a package): `corpus` (ingest), `encoders`, `extract`, `align`, `store`, `search`.
The library never imports Prefect; `flows/` orders these stages as Prefect tasks.
"""

__version__ = "0.1.0"
