"""Deliberately naive numpy references of the mathematics in ``include/kfac.h``, written from the
header's formulas, independently of the library: ``dense`` (factors, Kronecker solves, KL clip),
``conv`` (im2col, KFC/SUA factors, grouping) and ``adaptive`` (explicit Jacobians and Fisher of
a linear model, the quadratic model's 2×2 system). Nothing here calls the library."""
