use es2_wgpu::eval::geometry::{self, LayerGeometry};
use es2_wgpu::eval::Rows;
use es2_wgpu::ops::separation::{reference, Distance, Pair, SeparationOptions};
use es2_wgpu::testing::rel_error_f64;

use super::random_rows;

const PAIRS: [Pair; 3] = [Pair::Centroid, Pair::Pairwise, Pair::BaseCentroid];
const DISTANCES: [Distance; 3] = [Distance::L2, Distance::SqL2, Distance::Cosine];

fn close(what: &str, ours: f64, reference: f64) {
    let err = rel_error_f64(&[ours], &[reference]);
    assert!(err <= 1e-12, "{what}: {ours} vs {reference} ({err:.1e})");
}

#[test]
fn layer_distance_matches_the_separation_reference() {
    let cols = 37;
    for (seed, (n_h, n_s)) in [(7usize, 11usize), (1, 1), (13, 5)].into_iter().enumerate() {
        let seed = seed as u64 * 10;
        let h = random_rows(seed, n_h, cols, 0.4);
        let s = random_rows(seed + 1, n_s, cols, -0.2);
        let nu = geometry::mean_norm(Rows::new(&s, cols).unwrap());
        let centroid = geometry::centroid(Rows::new(&s, cols).unwrap());
        for pair in PAIRS {
            let other = if pair == Pair::BaseCentroid {
                &centroid
            } else {
                &s
            };
            for distance in DISTANCES {
                let options = SeparationOptions {
                    pair,
                    distance,
                    ..Default::default()
                };
                let ours = geometry::layer_distance(
                    Rows::new(&h, cols).unwrap(),
                    Rows::new(other, cols).unwrap(),
                    nu,
                    &options,
                );
                let want = reference::layer_distance(&h, other, cols, nu, &options);
                close(&format!("{pair:?} {distance:?} {n_h}x{n_s}"), ours, want);
            }
        }
    }
}

#[test]
fn layer_geometry_is_raw_and_normalised_as_training_normalises() {
    let cols = 19;
    let h = random_rows(3, 9, cols, 1.0);
    let s = random_rows(4, 14, cols, -0.5);
    let (hr, sr) = (Rows::new(&h, cols).unwrap(), Rows::new(&s, cols).unwrap());
    let nu = geometry::mean_norm(sr);
    let norms: f64 = s
        .chunks(cols)
        .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
        .sum();
    close("ν", nu, norms / 14.0);
    let g = LayerGeometry::measure(hr, sr, nu).unwrap();
    for distance in DISTANCES {
        for (pair, raw, normalised) in [
            (Pair::Centroid, g.centroid, g.centroid_normalised),
            (Pair::Pairwise, g.pairwise, g.pairwise_normalised),
        ] {
            let options = SeparationOptions {
                pair,
                distance,
                ..Default::default()
            };
            let what = format!("{pair:?} {distance:?}");
            close(
                &what,
                normalised.get(distance),
                reference::layer_distance(&h, &s, cols, nu, &options),
            );
            close(
                &what,
                raw.get(distance),
                reference::layer_distance(&h, &s, cols, 1.0, &options),
            );
        }
    }
    close("L2/ν", g.centroid_normalised.l2 * nu, g.centroid.l2);
    close(
        "sq-L2/ν²",
        g.pairwise_normalised.sq_l2 * nu * nu,
        g.pairwise.sq_l2,
    );
    assert_eq!(g.centroid_normalised.cosine, g.centroid.cosine);
    assert!(LayerGeometry::measure(hr, sr, 0.0).is_err());
    assert!(LayerGeometry::measure(hr, Rows::new(&[], cols).unwrap(), nu).is_err());
}

/// Eigenvalues and eigenvectors (columns, as rows of the result) of a symmetric matrix by
/// cyclic Jacobi rotations: the test's independent reference for PCA.
fn jacobi_eigen(mut a: Vec<Vec<f64>>) -> Vec<(f64, Vec<f64>)> {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = 0.5 * (2.0 * a[p][q]).atan2(a[q][q] - a[p][p]);
                let (s, c) = theta.sin_cos();
                // A ← GᵀAG: columns p, q of every row, then rows p and q.
                for row in a.iter_mut().chain(v.iter_mut()) {
                    let (xp, xq) = (row[p], row[q]);
                    row[p] = c * xp - s * xq;
                    row[q] = s * xp + c * xq;
                }
                let (rp, rq) = (a[p].clone(), a[q].clone());
                a[p] = rp.iter().zip(&rq).map(|(x, y)| c * x - s * y).collect();
                a[q] = rp.iter().zip(&rq).map(|(x, y)| s * x + c * y).collect();
            }
        }
    }
    let mut pairs: Vec<(f64, Vec<f64>)> = (0..n)
        .map(|i| (a[i][i], v.iter().map(|row| row[i]).collect()))
        .collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    pairs
}

fn covariance(rows: &[f64], cols: usize) -> Vec<Vec<f64>> {
    let n = rows.len() / cols;
    let mean: Vec<f64> = (0..cols)
        .map(|j| rows.chunks(cols).map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    (0..cols)
        .map(|i| {
            (0..cols)
                .map(|j| {
                    rows.chunks(cols)
                        .map(|r| (r[i] - mean[i]) * (r[j] - mean[j]))
                        .sum::<f64>()
                        / (n - 1) as f64
                })
                .collect()
        })
        .collect()
}

#[test]
fn pca_finds_the_covariance_top_eigenvectors() {
    let cols = 9;
    // Anisotropic data: channel j scaled by (j + 1) so the eigenvalues are distinct.
    let scale = |rows: Vec<f64>| -> Vec<f64> {
        rows.iter()
            .enumerate()
            .map(|(i, x)| x * ((i % cols) + 1) as f64)
            .collect()
    };
    let h = scale(random_rows(20, 23, cols, 0.7));
    let s = scale(random_rows(21, 17, cols, -0.4));
    let p =
        geometry::project_2d(Rows::new(&h, cols).unwrap(), Rows::new(&s, cols).unwrap()).unwrap();
    let pooled: Vec<f64> = h.iter().chain(&s).copied().collect();
    let cov = covariance(&pooled, cols);
    let eigen = jacobi_eigen(cov.clone());
    let trace: f64 = (0..cols).map(|i| cov[i][i]).sum();
    for (k, (value, vector)) in eigen.iter().take(2).enumerate() {
        close(&format!("λ{k}"), p.variance[k], *value);
        close(&format!("explained {k}"), p.explained[k], value / trace);
        let sign = if geometry::dot(&p.components[k], vector) < 0.0 {
            -1.0
        } else {
            1.0
        };
        let flipped: Vec<f64> = vector.iter().map(|x| sign * x).collect();
        let err = rel_error_f64(&p.components[k], &flipped);
        assert!(err < 1e-8, "component {k}: {err:.1e}");
        let largest =
            p.components[k]
                .iter()
                .copied()
                .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        assert!(largest > 0.0, "sign convention: largest entry positive");
    }
    // Coordinates are the centred rows' projections, in order.
    assert_eq!((p.harmful.len(), p.harmless.len()), (23, 17));
    let row = &s[cols * 5..cols * 6];
    let centred: Vec<f64> = row.iter().zip(&p.mean).map(|(x, m)| x - m).collect();
    close(
        "coordinate",
        p.harmless[5][1],
        geometry::dot(&centred, &p.components[1]),
    );
}

#[test]
fn pca_recovers_planted_axes_deterministically() {
    let cols = 64;
    let mut u = vec![0.0; cols];
    let mut v = vec![0.0; cols];
    u[3] = -1.0; // planted with a negative largest entry: the sign convention must flip it
    v[40] = 1.0;
    let noise = random_rows(31, 120, cols, 0.0);
    // Coefficients on an ellipse: exactly uncorrelated, so the sample axes are u and v.
    let data: Vec<f64> = (0..120)
        .flat_map(|i| {
            let angle = std::f64::consts::TAU * i as f64 / 120.0;
            let (a, b) = (10.0 * angle.cos(), 4.0 * angle.sin());
            let (u, v, noise) = (&u, &v, &noise);
            (0..cols).map(move |j| a * u[j] + b * v[j] + 0.01 * noise[i * cols + j])
        })
        .collect();
    let (h, s) = data.split_at(60 * cols);
    let project =
        || geometry::project_2d(Rows::new(h, cols).unwrap(), Rows::new(s, cols).unwrap()).unwrap();
    let p = project();
    assert!(
        p.components[0][3] > 0.999,
        "first axis: {}",
        p.components[0][3]
    );
    assert!(
        p.components[1][40] > 0.999,
        "second axis: {}",
        p.components[1][40]
    );
    assert!(p.explained[0] + p.explained[1] > 0.99);
    assert_eq!(p, project(), "two runs give the same projection");
}

#[test]
fn pca_of_degenerate_data_does_not_fail() {
    let cols = 5;
    // Every row on one line: the second direction has zero variance.
    let line: Vec<f64> = (0..8)
        .flat_map(|i| (0..cols).map(move |j| (i as f64) * (j as f64 + 1.0)))
        .collect();
    let (h, s) = line.split_at(4 * cols);
    let p = geometry::project_2d(Rows::new(h, cols).unwrap(), Rows::new(s, cols).unwrap()).unwrap();
    assert!(
        p.variance[1].abs() < 1e-9 * p.variance[0],
        "{:?}",
        p.variance
    );
    let orthogonal = geometry::dot(&p.components[0], &p.components[1]);
    assert!(orthogonal.abs() < 1e-9 && (geometry::norm(&p.components[1]) - 1.0).abs() < 1e-9);
    let same = vec![1.5; 3 * cols];
    let flat = geometry::project_2d(
        Rows::new(&same, cols).unwrap(),
        Rows::new(&same, cols).unwrap(),
    )
    .unwrap();
    assert_eq!(flat.variance, [0.0, 0.0]);
    assert!(flat.harmful.iter().all(|c| c == &[0.0, 0.0]));
    let narrow = [1.0, 2.0];
    assert!(geometry::project_2d(
        Rows::new(&narrow, 1).unwrap(),
        Rows::new(&narrow, 1).unwrap()
    )
    .is_err());
}
