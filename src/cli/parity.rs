//! `distil parity FIXTURE… [--device D] [--dtype f32|bf16|f16]`: the encoder's parity checks
//! against `transformers` (the fixtures `scripts/make_fixtures.py` writes, as
//! `tests/parity.rs` reads them) on any device and matmul precision, from the release binary:
//! a GPU machine without a Rust toolchain runs them as they are.
//!
//! Every hidden state, attention map and MLM logit, the masked-LM loss and every parameter's
//! gradient are compared with PyTorch's (float32, CPU). In f32 the tolerances are the test
//! suite's: 1e-4 absolute forward, 1e-3 relative (to the largest reference value) for the
//! gradients. With the matmuls in bf16 or f16 (mixed precision as `training.bf16` /
//! `training.fp16` runs it: f32 weights, norms, softmax and loss) the forward errors are a few
//! units of the format's roundoff relative to the largest value: bf16 keeps 8 significant
//! bits (unit roundoff 2^-9 ≈ 2e-3), f16 11 (2^-12 ≈ 2.4e-4). Measured on the CPU (whose
//! bf16/f16 matmul rounds the same inputs and the product as cuBLAS does, accumulating in
//! f32) over the four fixtures: bf16 worst forward 1.9e-2 (BERT logits), worst gradient
//! 5.1e-2 (ALBERT's token-type embeddings: a sum over every token, through the shared layer
//! applied at every depth), the others ≤ 2.5e-2; f16 about 7-15× less (2.3e-3 forward,
//! 4.7e-3 gradients), the 2^3 its three extra bits give. The defaults leave about 2× room:
//! bf16 4e-2 forward / 1e-1 gradients, f16 5e-3 / 1e-2.

use crate::loss::{cross_entropy, masked_positions};
use crate::model::names::from_canonical;
use crate::model::{load_encoder, EncoderInput, ForwardOptions, LoadOptions};
use crate::recipe::parse_device;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MatmulDtype {
    F32,
    Bf16,
    F16,
}

impl MatmulDtype {
    pub fn dtype(self) -> DType {
        match self {
            MatmulDtype::F32 => DType::F32,
            MatmulDtype::Bf16 => DType::BF16,
            MatmulDtype::F16 => DType::F16,
        }
    }

    /// (forward, gradient) tolerances; see the module documentation.
    fn tolerances(self) -> (f32, f32) {
        match self {
            MatmulDtype::F32 => (1e-4, 1e-3),
            MatmulDtype::Bf16 => (4e-2, 1e-1),
            MatmulDtype::F16 => (5e-3, 1e-2),
        }
    }
}

#[derive(Args, Debug)]
pub struct ParityArgs {
    /// Fixture directories (model + io.safetensors), e.g. tests/fixtures/bert.
    #[arg(required = true)]
    pub fixtures: Vec<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The matmuls' precision (f32 weights, norms, softmax and loss in every case).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: MatmulDtype,
    /// Forward tolerance (absolute in f32, relative to the largest value otherwise).
    #[arg(long)]
    pub tol_forward: Option<f32>,
    /// Gradient tolerance (relative to the largest reference value).
    #[arg(long)]
    pub tol_grad: Option<f32>,
}

/// One fixture's worst differences.
#[derive(Debug, Clone)]
pub struct FixtureReport {
    pub name: String,
    pub hidden: f32,
    pub attentions: f32,
    pub logits: f32,
    pub loss: f32,
    pub grad: f32,
    pub worst_grad: String,
    pub pass: bool,
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        bail!("shape {:?} vs reference {:?}", a.dims(), b.dims());
    }
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    max_abs(&(a - b.to_dtype(DType::F32)?)?)
}

/// Runs the checks on one fixture directory.
pub fn check_fixture(
    dir: &Path,
    device: &Device,
    dtype: MatmulDtype,
    tol: (f32, f32),
) -> Result<FixtureReport> {
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)
            .with_context(|| format!("{}: no io.safetensors", dir.display()))?;
    let get = |k: &str| -> Result<Tensor> {
        io.get(k)
            .cloned()
            .with_context(|| format!("{}: io.safetensors lacks {k}", dir.display()))
    };
    let ids = |k: &str| -> Result<Option<Tensor>> {
        io.get(k)
            .map(|t| Ok(t.to_dtype(DType::U32)?.to_device(device)?))
            .transpose()
    };
    let (mut enc, _) = load_encoder(dir, device, &LoadOptions::default())
        .with_context(|| format!("cannot load the fixture model in {}", dir.display()))?;
    enc.set_compute_dtype(dtype.dtype());
    let input_ids = ids("input_ids")?.context("io.safetensors lacks input_ids")?;
    let mask = ids("attention_mask")?;
    let tt = ids("token_type_ids")?;
    let input = EncoderInput {
        input_ids: &input_ids,
        attention_mask: mask.as_ref(),
        token_type_ids: tt.as_ref(),
    };
    // In f32 absolute differences, as tests/parity.rs; in half precision relative to the
    // largest reference value.
    let relative = dtype != MatmulDtype::F32;
    let diff = |ours: &Tensor, reference: &Tensor| -> Result<f32> {
        let d = max_abs_diff(ours, reference)?;
        Ok(if relative {
            d / max_abs(reference)?.max(1e-6)
        } else {
            d
        })
    };
    let out = enc.forward(
        &input,
        ForwardOptions {
            hidden_states: true,
            attentions: true,
        },
        None,
    )?;
    let mut hidden = 0f32;
    for (i, h) in out.hidden_states.iter().enumerate() {
        hidden = hidden.max(diff(h, &get(&format!("hidden_states.{i}"))?)?);
    }
    let mut attentions = 0f32;
    for (i, a) in out.attentions.iter().enumerate() {
        attentions = attentions.max(diff(a, &get(&format!("attentions.{i}"))?)?);
    }
    let logits = diff(&enc.mlm_logits(&out.last_hidden_state)?, &get("logits")?)?;

    // The masked-LM loss and every parameter's gradient.
    let labels: Vec<i64> = get("labels")?.flatten_all()?.to_vec1()?;
    let targets = masked_positions(&labels, device)?;
    let out = enc.forward(&input, ForwardOptions::default(), None)?;
    let lg = enc.mlm_logits_at(&out.last_hidden_state, &targets.positions)?;
    let loss_t = cross_entropy(&lg, &targets.targets)?;
    let expected: Vec<f32> = get("loss")?.flatten_all()?.to_vec1()?;
    let loss = (loss_t.to_scalar::<f32>()? - expected[0]).abs();
    let grads = enc.backward(&loss_t)?;
    let (mut grad, mut worst_grad) = (0f32, String::new());
    let mut reference_count = 0;
    for (name, var) in enc.params.vars() {
        let hf = from_canonical(enc.cfg.layout, name, enc.cfg.inner_group_num)
            .with_context(|| format!("{name}: no transformers name"))?;
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("parameter {name} got no gradient"))?;
        let reference = get(&format!("grad.{hf}"))?;
        reference_count += 1;
        if name.ends_with("attention.self.key.bias") {
            // Its true gradient is 0 (softmax ignores a shift shared by a query's scores):
            // both frameworks give float noise, compared with the largest gradient below.
            continue;
        }
        let d = max_abs_diff(g, &reference)? / max_abs(&reference)?.max(1e-6);
        if d > grad {
            (grad, worst_grad) = (d, hf);
        }
    }
    if reference_count != io.keys().filter(|k| k.starts_with("grad.")).count() {
        bail!("the model's parameters do not match the fixture's gradients");
    }
    let loss_tol = if relative {
        tol.0 * expected[0].abs().max(1.0)
    } else {
        tol.0
    };
    let pass =
        hidden < tol.0 && attentions < tol.0 && logits < tol.0 && loss < loss_tol && grad < tol.1;
    Ok(FixtureReport {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| dir.display().to_string()),
        hidden,
        attentions,
        logits,
        loss,
        grad,
        worst_grad,
        pass,
    })
}

/// Runs every fixture; returns the report's text and whether all passed.
pub fn run(args: &ParityArgs) -> Result<(String, bool)> {
    let device = parse_device(&args.device)
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?
        .device()?;
    let (f, g) = args.dtype.tolerances();
    let tol = (args.tol_forward.unwrap_or(f), args.tol_grad.unwrap_or(g));
    let mut s = String::new();
    let how = if args.dtype == MatmulDtype::F32 {
        "absolute"
    } else {
        "relative to the largest value"
    };
    let _ = writeln!(
        s,
        "parity with transformers on {} with {:?} matmuls (forward {how}, tolerance {:.0e}; gradients relative, tolerance {:.0e})",
        args.device, args.dtype, tol.0, tol.1
    );
    let _ = writeln!(
        s,
        "| fixture | hidden states | attentions | logits | loss | worst gradient | |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let mut all = true;
    for dir in &args.fixtures {
        let r = check_fixture(dir, &device, args.dtype, tol)
            .with_context(|| format!("fixture {}", dir.display()))?;
        all &= r.pass;
        let _ = writeln!(
            s,
            "| {} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.2e} ({}) | {} |",
            r.name,
            r.hidden,
            r.attentions,
            r.logits,
            r.loss,
            r.grad,
            r.worst_grad,
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    let _ = writeln!(s, "{}", if all { "all passed" } else { "FAILED" });
    Ok((s, all))
}
