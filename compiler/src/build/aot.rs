//! Ahead-of-time compilation: `.wasm`/`.wat` in, signed `.kiln` artifact out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::artifact;
use kiln_protocol::keys::SecretKey;
use kiln_protocol::manifest::{
    ArtifactTarget, CompileSettings, Digest, EngineInfo, Import, ImportKind, Manifest,
};
use std::ptr::NonNull;

use wasmer::sys::vm::{
    MemoryError, MemoryStyle, TableStyle, VMMemory, VMMemoryDefinition, VMTable, VMTableDefinition,
};
use wasmer::sys::{
    Architecture, BaseTunables, CompilerConfig, Cranelift, EngineBuilder, Features,
    NativeEngineExt, Tunables,
};
use wasmer::{ExternType, Module};
use wasmer::{MemoryType, TableType};
use wasmer_middlewares::Metering;
use wasmer_types::CompilationProgressCallback;

use crate::build::targets::ResolvedTarget;

/// The wasmer version this build links; devices must embed exactly the same.
pub const WASMER_VERSION: &str = wasmer_types::VERSION;

#[derive(Debug, Clone)]
pub struct CompileOptions {
    pub target: ResolvedTarget,
    pub name: String,
    pub version: u64,
    pub created_at: Option<u64>,
    /// Metering budget and memory cap, signed into the manifest.
    pub settings: CompileSettings,
    /// Check memory accesses in code instead of relying on a reservation; see
    /// [`BoundsChecked`].
    pub bounds_checks: bool,
}

#[derive(Debug)]
pub struct Compiled {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
    pub compile_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AotError {
    #[error("not valid WebAssembly text or binary: {0}")]
    Parse(String),
    #[error("invalid module: {0}")]
    Compile(String),
    #[error("cannot serialize the compiled module: {0}")]
    Serialize(String),
    #[error("cannot seal the artifact: {0}")]
    Seal(#[from] artifact::ArtifactError),
}

/// Compiles `source` (binary or text format) for `opts.target` and signs the result.
/// Equal inputs give byte-identical output: nothing depends on the host or the clock.
pub fn compile(
    source: &[u8],
    opts: &CompileOptions,
    key: &SecretKey,
) -> Result<Compiled, AotError> {
    compile_with_progress(source, opts, key, None)
}

/// How far Cranelift is: `(done, total)` in its own steps (about one per byte of
/// function bodies). Called from its worker threads.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// [`compile`], telling `progress` how far it is. Cranelift compiles the functions
/// on every core (`available_parallelism`).
pub fn compile_with_progress(
    source: &[u8],
    opts: &CompileOptions,
    key: &SecretKey,
    progress: Option<Progress>,
) -> Result<Compiled, AotError> {
    let wasm = wat::parse_bytes(source).map_err(|e| AotError::Parse(e.to_string()))?;
    let started = Instant::now();
    let mut cranelift = Cranelift::new();
    if let Some(budget) = opts.settings.metering {
        // Metering counts one point per operator; the device resets the points to the
        // per-call budget before every call and reads back what was used.
        cranelift.push_middleware(Arc::new(Metering::new(budget, |_: &_| 1)));
    }
    let mut engine: wasmer::Engine = EngineBuilder::new(cranelift)
        .set_target(Some(opts.target.wasmer_target()))
        .set_features(Some(wasm_features(&opts.target)))
        .into();
    if opts.bounds_checks {
        engine.set_tunables(BoundsChecked(BaseTunables::new()));
    }
    // Cranelift reports some unsupported lowerings by panicking; kiln turns that into
    // an error naming the module instead of dying.
    let module = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match progress {
        Some(report) => {
            let callback = CompilationProgressCallback::new(move |p| {
                if let (Some(done), Some(total)) = (p.phase_step(), p.phase_step_count()) {
                    report(done, total);
                }
                Ok(())
            });
            engine.new_module_with_progress(&wasm, callback)
        }
        None => Module::new(&engine, &wasm),
    }))
    .map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        AotError::Compile(format!(
            "Cranelift crashed compiling it for {}: {what}",
            opts.target.triple
        ))
    })?
    .map_err(|e| AotError::Compile(simd_hint(e.to_string(), &opts.target)))?;
    let payload = module
        .serialize()
        .map_err(|e| AotError::Serialize(e.to_string()))?;
    let compile_time = started.elapsed();

    let imports: Vec<Import> = module
        .imports()
        .map(|i| Import {
            module: i.module().to_string(),
            name: i.name().to_string(),
            kind: kind_of(i.ty()),
        })
        .collect();
    let manifest = Manifest {
        name: opts.name.clone(),
        version: opts.version,
        target: ArtifactTarget {
            triple: opts.target.triple.to_string(),
            cpu_features: opts.target.feature_names(),
            profile: opts.target.profile.clone(),
        },
        engine: EngineInfo {
            wasmer: WASMER_VERSION.into(),
            // The oldest ABI its imports allow, so older devices still run it.
            kiln_abi: kiln_protocol::abi::needed(
                imports.iter().map(|i| (i.module.as_str(), i.name.as_str())),
            ),
        },
        source: Digest::of(&wasm),
        payload: Digest::of(&payload),
        settings: opts.settings.clone(),
        imports,
        exports: module
            .exports()
            .functions()
            .map(|e| e.name().to_string())
            .collect(),
        created_at: opts.created_at,
        producer: format!("kiln {} (cranelift)", env!("CARGO_PKG_VERSION")),
    };
    let bytes = artifact::seal(&manifest, &payload, key)?;
    Ok(Compiled {
        bytes,
        manifest,
        compile_time,
    })
}

/// The WebAssembly features a target can run. Cranelift's riscv64 backend lowers
/// wasm SIMD only with the V extension, which wasmer 7.4.2 cannot enable (it panics
/// inside Cranelift otherwise), so SIMD is off for riscv64 and such modules are
/// rejected at validation with a clear message.
fn wasm_features(target: &ResolvedTarget) -> Features {
    // What wasmer's Cranelift enables by default for Linux targets...
    let mut features = Features::default();
    features
        .exceptions(true)
        .relaxed_simd(true)
        .wide_arithmetic(true);
    // ...minus what its riscv64 backend cannot lower.
    if matches!(target.triple.architecture, Architecture::Riscv64(_)) {
        features.simd(false).relaxed_simd(false);
    }
    features
}

fn simd_hint(message: String, target: &ResolvedTarget) -> String {
    if matches!(target.triple.architecture, Architecture::Riscv64(_)) && message.contains("SIMD") {
        format!("{message}; wasm SIMD needs the RISC-V V extension, which kiln cannot target yet")
    } else {
        message
    }
}

fn kind_of(ty: &ExternType) -> ImportKind {
    match ty {
        ExternType::Function(_) => ImportKind::Function,
        ExternType::Memory(_) => ImportKind::Memory,
        ExternType::Table(_) => ImportKind::Table,
        ExternType::Global(_) => ImportKind::Global,
        ExternType::Tag(_) => ImportKind::Tag,
    }
}

/// Compiles memories as "dynamic": every access is checked against the memory's
/// current size in code. The default ("static") elides those checks by reserving
/// 8 GiB of address space per memory and letting guard pages trap, which costs
/// nothing on a device's kernel but about 140 ms per instance under qemu-user 7.x,
/// which tracks every reserved page. The style is recorded in the compiled module,
/// so kilnd creates each memory the way its code expects.
struct BoundsChecked(BaseTunables);

impl Tunables for BoundsChecked {
    fn memory_style(&self, _: &MemoryType) -> MemoryStyle {
        MemoryStyle::Dynamic {
            offset_guard_size: 64 * 1024,
        }
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.0.table_style(table)
    }

    fn create_host_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
    ) -> Result<VMMemory, MemoryError> {
        self.0.create_host_memory(ty, style)
    }

    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, MemoryError> {
        // SAFETY: forwarded unchanged from wasmer, which guarantees the location.
        unsafe { self.0.create_vm_memory(ty, style, location) }
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.0.create_host_table(ty, style)
    }

    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        // SAFETY: forwarded unchanged from wasmer, which guarantees the location.
        unsafe { self.0.create_vm_table(ty, style, location) }
    }
}
