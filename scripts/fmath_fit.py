#!/usr/bin/env python3
"""Polynomial coefficients of src/fmath.rs and kernels/common/fmath.cuh (needs mpmath).

Chebyshev fits in 50-digit arithmetic (mpmath.chebyfit), rounded to f32; prints each
coefficient as a hex float and its decimal value, highest degree first, and the fit's error
before and after rounding. The tables in the sources were made with:

    scripts/fmath_fit.py tanh 0.625 8      # (tanh(x) - x) / x^3 in z = x^2, |x| < 0.625
    scripts/fmath_fit.py erfs 1.0 9        # erf(x) / x in z = x^2, |x| < 1 (the constant term
                                           #   2/sqrt(pi) is then used as a hi + lo pair)
    scripts/fmath_fit.py erfu 2 1 4 10     # ln(erfc(a)) + a^2 in u = a - 2, 1 <= a < 4
"""
import mpmath as mp, struct
mp.mp.dps = 50
def f32(v):
    return struct.unpack('f', struct.pack('f', float(v)))[0]
def fit(name, f, a, b, n):
    coeffs, err = mp.chebyfit(f, [a, b], n, error=True)
    # chebyfit returns highest degree first
    c32 = [f32(c) for c in coeffs]
    # error with f32-rounded coefficients, evaluated exactly
    maxe = 0
    for i in range(2001):
        t = a + (b - a) * i / 2000
        v = mp.polyval([mp.mpf(c) for c in c32], t)
        maxe = max(maxe, abs(v - f(t)))
    print(name, "deg", n - 1, "chebyfit err %.3e" % float(err), "f32 coeff err %.3e" % float(maxe))
    for c in c32:
        print("   %s  // %r" % (float(c).hex(), c))
import sys
which = sys.argv[1]
if which == 'tanh':
    T = float(sys.argv[2]); n = int(sys.argv[3])
    def P(z):
        if z == 0: return mp.mpf(-1)/3
        x = mp.sqrt(z); return (mp.tanh(x) - x) / (x * z)
    fit('tanh P(z)', P, 0, T*T, n)
if which == 'erfs':
    T = float(sys.argv[2]); n = int(sys.argv[3])
    def P(z):
        if z == 0: return 2/mp.sqrt(mp.pi)
        x = mp.sqrt(z); return mp.erf(x) / x
    fit('erf small P(z)', P, 0, T*T, n)
if which == 'erfl':
    A = float(sys.argv[2]); B = float(sys.argv[3]); n = int(sys.argv[4])
    fit('erf large Q(a)', lambda a: mp.log(mp.erfc(a)) + a*a, A, B, n)
if which == 'erfu':
    c = float(sys.argv[2]); A = float(sys.argv[3]); B = float(sys.argv[4]); n = int(sys.argv[5])
    fit('erf large Q(u), u=a-%g' % c, lambda u: mp.log(mp.erfc(u + c)) + (u + c)**2, A - c, B - c, n)
