"""gbm-pcnsl's machinery: one module per responsibility, under the numbered step scripts.

The scripts (step0 ... step6) parse their command line and call into this package; the
small contract every step shares (class labels, the HDF5 layout, the 8-bit image loader,
the patient rule, UserError and run_main) is `gbmpcnsl_common.py` beside it.
"""

__version__ = "1.0.0"
