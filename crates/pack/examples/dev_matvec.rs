use adadim_pack::{ActBits, PackedLinear};
use adadim_quantize::{rtn, Axis, QuantSpec, Zero};
use std::time::Instant;
fn mat(rows: usize, cols: usize, bits: u8, axis: Axis) -> PackedLinear {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (rows * 31 + cols) as u64;
    let w: Vec<f32> = (0..rows * cols).map(|_| { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5 }).collect();
    let q = rtn(&w, rows, cols, &QuantSpec { bits, group: Some(128), axis, zero: Zero::Awq }).unwrap();
    PackedLinear::from_quantized(&q)
}
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (rows, cols): (usize, usize) = (args[1].parse().unwrap(), args[2].parse().unwrap());
    let bits: u8 = args[3].parse().unwrap();
    let acts: Vec<ActBits> = if args.len() > 4 && args[4] == "8" { vec![ActBits::I8] } else if args.len() > 4 { vec![ActBits::I16] } else { vec![ActBits::I16, ActBits::I8] };
    let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut y = vec![0f32; rows];
    let sets: Vec<Vec<PackedLinear>> = [Axis::Oc, Axis::Ic].into_iter().map(|axis| {
        let one = mat(rows, cols, bits, axis);
        let copies = (192usize << 20).div_ceil(one.bytes_read()).max(1);
        (0..copies).map(|_| one.clone()).collect()
    }).collect();
    for act in acts {
        let mut best = [f64::MAX; 2];
        for _ in 0..9 {
            for (i, mats) in sets.iter().enumerate() {
                mats[0].matvec_act(act, &x, &mut y);
                let t0 = Instant::now();
                for m in mats { m.matvec_act(act, &x, &mut y); }
                std::hint::black_box(&y);
                best[i] = best[i].min(t0.elapsed().as_secs_f64() / mats.len() as f64);
            }
        }
        let gb = |i: usize| sets[i][0].bytes_read() as f64 / best[i] / 1e9;
        println!("{act:?} {rows}x{cols} w{bits}: oc {:.1} us {:.1} GB/s | ic {:.1} us {:.1} GB/s | ic/oc {:.3}", best[0] * 1e6, gb(0), best[1] * 1e6, gb(1), best[1] / best[0]);
    }
}
