"""Products and their attributes: the AttributeSchema, the Parquet catalogue, and the importers.

Importing this package registers every importer in `IMPORTERS` (Fashion-MNIST, Fashion Product
Images, DeepFashion, and `table`: a shop's own CSV / Parquet / JSON Lines file): a new dataset
is one module that decorates its `import_<name>(source, dest, **options)` with
`@IMPORTERS.register("<name>")`, imported here.
"""

from atelier.catalog import deepfashion, fashion_mnist, fashion_product_images, table  # noqa: F401  (registers them)
from atelier.catalog.catalogue import Catalogue, write_catalogue
from atelier.catalog.importers import IMPORTERS, importer_options, run_import
from atelier.catalog.schema import AttributeGroup, AttributeSchema, InvalidAttributes

__all__ = [
    "IMPORTERS", "AttributeGroup", "AttributeSchema", "Catalogue", "InvalidAttributes", "importer_options",
    "run_import", "write_catalogue",
]
