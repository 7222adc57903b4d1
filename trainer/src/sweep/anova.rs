//! Does a key separate its settings beyond the seeds' spread? One-way analysis of variance (Fisher 1925): with
//! k values of a key, n runs in all, the F statistic is the spread between the values' means over the spread
//! between seeds of one value,
//!
//!   F = [sum_i n_i (mean_i - mean)^2 / (k - 1)] / [sum_i sum_j (x_ij - mean_i)^2 / (n - k)],
//!
//! and p = P(F(k - 1, n - k) >= F) is the chance of a spread at least this large if every value trained alike
//! (seed 004's question: does the two-sample test separate settings that the classifier score cannot?).
//! The F distribution's tail is a regularised incomplete beta function (Abramowitz & Stegun 26.6.2),
//! evaluated by its continued fraction (Numerical Recipes, 3rd ed., sec. 6.4).

/// A one-way analysis of variance over groups of runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anova {
    pub f: f64,
    /// Degrees of freedom: between the groups (k - 1), within them (n - k).
    pub df: (usize, usize),
    /// P(F(df) >= f).
    pub p: f64,
}

/// The analysis of `groups` (each group's runs; empty groups are left out). None when it is undefined: fewer than
/// two groups, no more runs than groups, or no spread within the groups at all.
pub fn one_way(groups: &[Vec<f64>]) -> Option<Anova> {
    let groups: Vec<&Vec<f64>> = groups.iter().filter(|g| !g.is_empty()).collect();
    let k = groups.len();
    let n: usize = groups.iter().map(|g| g.len()).sum();
    if k < 2 || n <= k {
        return None;
    }
    let means: Vec<f64> = groups.iter().map(|g| g.iter().sum::<f64>() / g.len() as f64).collect();
    let all = groups.iter().flat_map(|g| g.iter()).sum::<f64>() / n as f64;
    let between: f64 = groups.iter().zip(&means).map(|(g, m)| g.len() as f64 * (m - all).powi(2)).sum();
    let within: f64 = groups.iter().zip(&means).map(|(g, m)| g.iter().map(|x| (x - m).powi(2)).sum::<f64>()).sum();
    if within <= 0.0 {
        return None;
    }
    let df = (k - 1, n - k);
    let f = (between / df.0 as f64) / (within / df.1 as f64);
    Some(Anova { f, df, p: f_tail(f, df.0 as f64, df.1 as f64) })
}

/// P(F(d1, d2) >= f) = I_x(d2 / 2, d1 / 2) at x = d2 / (d2 + d1 f) (A&S 26.6.2).
fn f_tail(f: f64, d1: f64, d2: f64) -> f64 {
    if f <= 0.0 {
        return 1.0;
    }
    beta_regularized(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))
}

/// I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1] (NR 6.4: the continued
/// fraction converges fast for x < (a + 1) / (a + b + 2); the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) covers the
/// rest).
fn beta_regularized(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of I_x(a, b) by the modified Lentz method (NR 6.4, `betacf`).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // the even step, then the odd one
        for aa in [m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))] {
            d = 1.0 + aa * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + aa / c;
            c = if c.abs() < TINY { TINY } else { c };
            h *= d * c;
            if aa < 0.0 && (d * c - 1.0).abs() < 1e-14 {
                return h;
            }
        }
    }
    h
}

/// ln Gamma(x) for x > 0 (Lanczos 1964, g = 7, nine coefficients: ~15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // the reflection formula: Gamma(x) Gamma(1 - x) = pi / sin(pi x)
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let s = C[1..].iter().enumerate().fold(C[0], |s, (i, c)| s + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gamma_and_beta_functions_match_their_closed_forms() {
        for (x, want) in
            [(1.0, 0f64), (5.0, 24f64.ln()), (0.5, std::f64::consts::PI.sqrt().ln()), (10.5, 13.940_625_219_403_763)]
        {
            assert!((ln_gamma(x) - want).abs() < 1e-12, "ln Gamma({x}) = {}, want {want}", ln_gamma(x));
        }
        // I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b, I_x(a, b) + I_{1-x}(b, a) = 1
        for &x in &[0.05, 0.3, 0.7, 0.99] {
            assert!((beta_regularized(2.5, 1.0, x) - x.powf(2.5)).abs() < 1e-12);
            assert!((beta_regularized(1.0, 3.0, x) - (1.0 - (1.0 - x).powi(3))).abs() < 1e-12);
            let s = beta_regularized(2.0, 5.5, x) + beta_regularized(5.5, 2.0, 1.0 - x);
            assert!((s - 1.0).abs() < 1e-12, "{s}");
        }
    }

    #[test]
    fn the_f_tail_matches_its_closed_form_and_the_tables() {
        // d1 = 2: P(F >= f) = (1 + 2 f / d2)^(-d2 / 2)
        for &(f, d2) in &[(0.5f64, 6.0f64), (5.14, 6.0), (19.0, 3.0), (3.0, 20.0)] {
            let want = (1.0 + 2.0 * f / d2).powf(-d2 / 2.0);
            assert!((f_tail(f, 2.0, d2) - want).abs() < 1e-12, "F(2, {d2}) at {f}");
        }
        // the 5% and 1% points of F(2, 6) and F(4, 10) (statistical tables)
        for &(f, d1, d2, p) in &[(5.143, 2.0, 6.0, 0.05), (10.925, 2.0, 6.0, 0.01), (3.478, 4.0, 10.0, 0.05)] {
            assert!((f_tail(f, d1, d2) - p).abs() < 2e-4, "F({d1}, {d2}) at {f}: {}", f_tail(f, d1, d2));
        }
    }

    #[test]
    fn the_analysis_tells_settings_apart_only_beyond_the_seeds_spread() {
        // three settings, three seeds each: means 80, 83, 83 with a seed spread of ~5 (the T study's scores)
        let close = [vec![0.806, 0.752, 0.868], vec![0.802, 0.794, 0.904], vec![0.836, 0.780, 0.878]];
        let a = one_way(&close).unwrap();
        assert_eq!(a.df, (2, 6));
        assert!(a.p > 0.5, "{a:?}");
        let apart = [vec![0.80, 0.82, 0.81], vec![0.90, 0.91, 0.89], vec![0.60, 0.62, 0.61]];
        assert!(one_way(&apart).unwrap().p < 1e-6);
        // F by hand: means 1, 2, 3 (grand 2): between 2 (1 + 0 + 1) / 2 = 2, within 3 (0.25 + 0.25) / 3 = 0.5
        let a = one_way(&[vec![0.5, 1.5], vec![1.5, 2.5], vec![2.5, 3.5], vec![]]).unwrap();
        assert!((a.f - 4.0).abs() < 1e-12 && a.df == (2, 3), "{a:?}");
        assert_eq!(one_way(&[vec![1.0, 2.0]]), None, "one group");
        assert_eq!(one_way(&[vec![1.0], vec![2.0]]), None, "no runs within a group to spread");
        assert_eq!(one_way(&[vec![1.0, 1.0], vec![2.0, 2.0]]), None, "no spread within the groups");
    }
}
