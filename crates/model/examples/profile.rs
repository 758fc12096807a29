use adadim_model::*;
use std::time::Instant;
fn main() {
    let dir = std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/adadim/models/smollm2");
    let ck = adadim_load::Checkpoint::open(&dir).unwrap();
    let m = Model::load(&ck, 2048, &mut |_, _| {}).unwrap();
    let ids: Vec<u32> = (0..2047).map(|i| (i * 7919 % 49152) as u32).collect();
    let x = m.embed(&ids).unwrap();
    let b = &m.blocks[0];
    for _ in 0..2 {
        let t = Instant::now();
        let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, 1e-5).unwrap();
        let t1 = t.elapsed();
        let a = b.attention(&h, &m.rope).unwrap();
        let t2 = t.elapsed();
        let o = b.o.forward(&a).unwrap();
        let x2 = (&x + o).unwrap();
        let t3 = t.elapsed();
        let h2 = candle_nn::ops::rms_norm(&x2, &b.mlp_norm, 1e-5).unwrap();
        let g = b.gate.forward(&h2).unwrap();
        let t4 = t.elapsed();
        let u = b.up.forward(&h2).unwrap();
        let t5 = t.elapsed();
        let _ = (g, u); let act = b.mlp_hidden(&h2).unwrap();
        let t6 = t.elapsed();
        let d = b.down.forward(&act).unwrap();
        let _y = (&x2 + d).unwrap();
        let t7 = t.elapsed();
        println!("norm {:?} attn {:?} o+res {:?} norm+gate {:?} up {:?} silu*mul {:?} down+res {:?}", t1, t2-t1, t3-t2, t4-t3, t5-t4, t6-t5, t7-t6);
    }
    {
        use candle_core::Tensor;
        let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, 1e-5).unwrap();
        let (t_, nh, nkv, hd) = (2047usize, 9usize, 3usize, 64usize);
        let g = 3;
        for _ in 0..2 {
        let t = Instant::now();
        let q = b.q.forward(&h).unwrap(); let k = b.k.forward(&h).unwrap(); let v = b.v.forward(&h).unwrap();
        let a1 = t.elapsed();
        let heads = |x: Tensor, n: usize| x.reshape((1, t_, n, hd)).unwrap().transpose(1, 2).unwrap();
        let q = heads(q, nh).contiguous().unwrap(); let k = heads(k, nkv).contiguous().unwrap(); let v = heads(v, nkv).contiguous().unwrap();
        let a2 = t.elapsed();
        let cos = Tensor::zeros((t_, hd/2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = candle_nn::rotary_emb::rope(&q, &cos, &cos).unwrap(); let k = candle_nn::rotary_emb::rope(&k, &cos, &cos).unwrap();
        let a3 = t.elapsed();
        let q = (q * 0.125).unwrap().reshape((nkv, g * t_, hd)).unwrap();
        let k = k.reshape((nkv, t_, hd)).unwrap();
        let kt = k.t().unwrap();
        let a4 = t.elapsed();
        let scores = q.matmul(&kt).unwrap();
        let a5 = t.elapsed();
        let p = candle_nn::ops::softmax_last_dim(&scores.reshape((nh, t_, t_)).unwrap()).unwrap().reshape((nkv, g*t_, t_)).unwrap();
        let a6 = t.elapsed();
        let ctx = p.matmul(&v.reshape((nkv, t_, hd)).unwrap()).unwrap();
        let a7 = t.elapsed();
        let _c = ctx.reshape((nh, t_, hd)).unwrap().transpose(0, 1).unwrap().reshape((t_, nh * hd)).unwrap();
        let a8 = t.elapsed();
        println!("qkv {:?} heads {:?} rope {:?} scale {:?} QK {:?} softmax {:?} PV {:?} merge {:?}", a1, a2-a1, a3-a2, a4-a3, a5-a4, a6-a5, a7-a6, a8-a7);
        }
    }
    let t = Instant::now();
    let hid = m.forward_hidden(&ids).unwrap();
    println!("forward 2047: {:?}", t.elapsed());
    let t = Instant::now();
    let _ = m.target_logprobs(&hid, &ids, 512).unwrap();
    println!("head+logprobs: {:?}", t.elapsed());
}
