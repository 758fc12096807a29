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

/// Embeddings of `ids` by `bert`, `batch` sentences per forward pass, longest first (so a batch
/// pads little), returned in the order of `ids`; an error comes with the index (in sorted
/// order) of its batch's first sentence.
pub fn embed_sorted(
    bert: &adadim_model::Bert,
    ids: &[Vec<u32>],
    batch: usize,
) -> std::result::Result<Vec<Vec<f32>>, Box<(usize, adadim_model::ModelError)>> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let mut out = vec![Vec::new(); ids.len()];
    for (n, chunk) in order.chunks(batch.max(1)).enumerate() {
        let b: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        let e = bert.embed(&b).map_err(|e| Box::new((n * batch, e)))?;
        for (&i, e) in chunk.iter().zip(e) {
            out[i] = e;
        }
    }
    Ok(out)
}

/// The cache file of a reference model's embeddings of some sentences: named by the SHA-256
/// of the model file and of the token ids, so any change to either misses.
pub fn cache_path(dir: &std::path::Path, model_sha256: &str, ids: &[Vec<u32>]) -> std::path::PathBuf {
    let mut bytes = Vec::new();
    for s in ids {
        bytes.extend_from_slice(&(s.len() as u32).to_le_bytes());
        s.iter().for_each(|id| bytes.extend_from_slice(&id.to_le_bytes()));
    }
    let ids_sha = adadim_load::fetch::sha256_hex(&bytes);
    dir.join(format!("{}-{}.f32", &model_sha256[..16], &ids_sha[..16]))
}

/// Reads cached embeddings (`n` of `dim` floats, little-endian); `None` when absent or of
/// another size (then they are computed again).
pub fn read_cache(path: &std::path::Path, n: usize, dim: usize) -> Option<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != n * dim * 4 {
        return None;
    }
    let v: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Some(v.chunks(dim).map(<[f32]>::to_vec).collect())
}

/// Writes embeddings for [`read_cache`], through a temporary file renamed into place.
pub fn write_cache(path: &std::path::Path, e: &[Vec<f32>]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let bytes: Vec<u8> = e.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    let tmp = adadim_load::fetch::partial_path(path);
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cached_embeddings_come_back_only_for_the_same_model_and_sentences() {
        let d = tempfile::tempdir().unwrap();
        let ids = vec![vec![101, 7, 102], vec![101, 102]];
        let e = vec![vec![0.5f32, -1.0, 2.0], vec![3.0, 0.25, -0.125]];
        let p = super::cache_path(d.path(), "ab".repeat(32).as_str(), &ids);
        assert_eq!(super::read_cache(&p, 2, 3), None);
        super::write_cache(&p, &e).unwrap();
        assert_eq!(super::read_cache(&p, 2, 3), Some(e));
        assert_eq!(super::read_cache(&p, 2, 4), None, "another width");
        assert_ne!(p, super::cache_path(d.path(), "cd".repeat(32).as_str(), &ids), "another model");
        assert_ne!(p, super::cache_path(d.path(), "ab".repeat(32).as_str(), &[vec![101, 7], vec![102, 102]]));
    }

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
