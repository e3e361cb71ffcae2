"""The labels :meth:`stac_optax.STACPartition.labels` gives each leaf, the
keys of the transformations of ``optax.partition``, and their names in
words."""

SIGN = "sign"
ADAMW = "adamw"
FROZEN = "frozen"

# what messages and tables call each section
SECTION_NAMES = {SIGN: "trunk", ADAMW: "cap", FROZEN: "frozen"}
