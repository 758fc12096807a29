//! The one error type of the crate: every bad input is reported, never a panic or a NaN.

/// Everything that can go wrong while quantizing one matrix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bit width has no integer grid here (`QuantSpec::bits`).
    #[error("unsupported bit width {bits}: expected 2, 3, 4 or 8")]
    Bits {
        /// The rejected bit width.
        bits: u8,
    },
    /// `QuantSpec::group` was `Some(0)`.
    #[error("group size must be at least 1 (use no group for whole channels)")]
    ZeroGroup,
    /// A buffer does not have the length its stated shape implies.
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        /// Which buffer, with its expected shape.
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// A matrix with no rows or no columns has nothing to quantize.
    #[error("empty matrix [{rows}, {cols}]")]
    Empty {
        /// Row count received.
        rows: usize,
        /// Column count received.
        cols: usize,
    },
    /// A weight is NaN or infinite: min-max fitting would poison its whole group.
    #[error("weight at (row {row}, col {col}) is {value}, not finite")]
    NonFiniteWeight {
        /// Output channel.
        row: usize,
        /// Input channel.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// A calibration input is NaN or infinite: it would poison every entry of H it touches.
    #[error("calibration input at (token {token}, channel {channel}) is {value}, not finite")]
    NonFiniteInput {
        /// Token (row of the `[tokens, C_in]` batch).
        token: usize,
        /// Input channel.
        channel: usize,
        /// The offending value.
        value: f32,
    },
    /// A Hessian handed in whole (`Hessian::from_matrix`) holds a NaN or infinity.
    #[error("Hessian entry ({row}, {col}) is {value}, not finite")]
    NonFiniteHessian {
        /// Row of H.
        row: usize,
        /// Column of H.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// `H + damp I` never factored, even after raising the damping `tries - 1` times.
    #[error(
        "Hessian is not positive definite even with damping {percdamp} x mean(diag(H)) \
         after {tries} tries; raise percdamp or add calibration tokens"
    )]
    NotPositiveDefinite {
        /// The last damping tried, as a fraction of `mean(diag(H))`.
        percdamp: f64,
        /// How many factorizations were attempted.
        tries: u32,
    },
    /// A stored code is above the grid's largest code `2^bits - 1`.
    #[error("code {code} at (row {row}, col {col}) exceeds maxq {maxq}")]
    Code {
        /// Output channel.
        row: usize,
        /// Input channel.
        col: usize,
        /// The offending code.
        code: u8,
        /// `2^bits - 1`.
        maxq: u8,
    },
    /// A size budget below what the cheapest layout of every linear needs.
    #[error(
        "budget of {budget} bytes is below the cheapest layouts' {cheapest} (the layouts span {cheapest} to {dearest})"
    )]
    Budget {
        /// The budget asked for.
        budget: u64,
        /// Bytes of the cheapest layout of every linear.
        cheapest: u64,
        /// Bytes of the dearest layout of every linear.
        dearest: u64,
    },
    /// An option or a part is out of range; the text says which and why.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
