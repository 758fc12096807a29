//! Sentence-embedding fidelity of a model against a reference (float) model on the same
//! sentences: cosine similarity per sentence (mean, 5th percentile) and retrieval agreement
//! (queries against a corpus: does the model find the reference's nearest neighbours,
//! recall@1 and @10).

use rayon::prelude::*;

/// The sentences of a text: lines split after sentence-final `.`, `?`, `!` followed by a space;
/// WikiText's ` = Heading = ` lines and fragments of fewer than 4 words dropped.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('=') {
            continue;
        }
        let mut start = 0;
        let b = line.as_bytes();
        for i in 0..b.len() {
            let end = matches!(b[i], b'.' | b'?' | b'!') && (i + 1 == b.len() || b[i + 1] == b' ');
            if end {
                out.push(line[start..=i].trim().to_string());
                start = i + 1;
            }
        }
        if start < line.len() {
            out.push(line[start..].trim().to_string());
        }
    }
    out.retain(|s| s.split_whitespace().count() >= 4);
    out
}

/// Cosine similarity of each pair.
pub fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
            let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny).max(f64::MIN_POSITIVE)
        })
        .collect()
}

/// The `k` corpus rows most cosine-similar to each query, most similar first (ties: lower index).
pub fn neighbours(queries: &[Vec<f32>], corpus: &[Vec<f32>], k: usize) -> Vec<Vec<usize>> {
    let unit = |v: &Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let corpus: Vec<Vec<f32>> = corpus.iter().map(unit).collect();
    queries
        .par_iter()
        .map(|q| {
            let q = unit(q);
            let mut s: Vec<(f32, usize)> =
                corpus.iter().enumerate().map(|(i, c)| (c.iter().zip(&q).map(|(a, b)| a * b).sum(), i)).collect();
            let k = k.min(s.len());
            s.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            s.truncate(k);
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            s.into_iter().map(|x| x.1).collect()
        })
        .collect()
}

/// Recall@1 (the model's first neighbour is the reference's) and recall@k (the share of the
/// reference's k neighbours among the model's k), averaged over queries.
pub fn agreement(reference: &[Vec<usize>], model: &[Vec<usize>]) -> (f64, f64) {
    let n = reference.len().max(1) as f64;
    let at1 = reference.iter().zip(model).filter(|(r, m)| r.first() == m.first()).count() as f64 / n;
    let atk = reference
        .iter()
        .zip(model)
        .map(|(r, m)| r.iter().filter(|i| m.contains(i)).count() as f64 / r.len().max(1) as f64)
        .sum::<f64>()
        / n;
    (at1, atk)
}

/// The `p`-th percentile (0-100) by the nearest rank.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_and_filter() {
        let t = " = Heading = \n The cat sat on the mat. It was warm! Why was it warm ? No.\n Short one .\n";
        assert_eq!(sentences(t), ["The cat sat on the mat.", "Why was it warm ?"]);
    }

    #[test]
    fn neighbours_and_agreement() {
        let corpus = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.7, 0.7], vec![-1.0, 0.0]];
        let q = vec![vec![0.9, 0.1], vec![0.1, 0.9]];
        let nn = neighbours(&q, &corpus, 2);
        assert_eq!(nn, [vec![0, 2], vec![1, 2]]);
        let moved = vec![vec![2, 0], vec![1, 3]];
        assert_eq!(agreement(&nn, &moved), (0.5, 0.75));
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 5.0), 1.0);
        let c = cosines(&[vec![1.0, 0.0]], &[vec![2.0, 0.0]]);
        assert!((c[0] - 1.0).abs() < 1e-12);
    }
}
