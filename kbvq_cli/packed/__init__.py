"""The packed model format, defined once: tensor names and unit layout (`layout`), unit metadata (`schema`),
code bit-packing (`bitpack`), storage accounting, formula and measured (`storage`), the runtime modules
that compute expert projections from their codes (`modules`), and the loader (`loader`).

`kbvq pack` writes it; the loader, `kbvq pack --dense` and `kbvq report` read it through these modules.
"""
