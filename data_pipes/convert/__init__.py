"""Raw CTR files -> the Parquet data set layout of :mod:`data_pipes.schema`, streamed.

    >>> from data_pipes.convert import convert_criteo                        # doctest: +SKIP
    >>> res = convert_criteo("train.txt", "data/criteo", min_count=10)       # doctest: +SKIP
    >>> print(res.summary()); res.meta.cardinalities()                      # doctest: +SKIP

* :func:`convert_criteo` (Kaggle ``train.txt``, 1TB ``day_N`` directory, or explicit train/valid/test files),
  :func:`convert_avazu`, :func:`convert_movielens` (RecBole atomic files, e.g. ML-100K);
* ``mlet convert criteo|avazu|movielens ...`` or ``python -m mlet_torchrec.cli.convert ...`` (:mod:`.cli`).

Categorical ids come from vocabularies counted on the train split (values seen fewer than ``min_count``
times -> id 0, the OOV id) or from hashing (``hash_buckets``); see :mod:`.vocab`. Memory does not grow
with the input (text is read in blocks; see :mod:`.job`), output appears only when complete, and bad
input raises :class:`~data_pipes.errors.DataError` naming file, row and column (``lenient=True`` counts
and maps bad values instead).
"""

from data_pipes.convert.avazu import convert_avazu
from data_pipes.convert.criteo import convert_criteo
from data_pipes.convert.job import ConvertResult
from data_pipes.convert.movielens import convert_movielens
from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.vocab import (
    OOV_ID,
    HashEncoder,
    VocabCounter,
    Vocabulary,
    hash_strings,
)

__all__ = [
    "OOV_ID",
    "ConvertOptions",
    "ConvertResult",
    "HashEncoder",
    "VocabCounter",
    "Vocabulary",
    "convert_avazu",
    "convert_criteo",
    "convert_movielens",
    "hash_strings",
]
