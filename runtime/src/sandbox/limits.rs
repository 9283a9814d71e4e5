//! The linear-memory cap. Wasmer asks the engine's `Tunables` for every memory it
//! creates; kilnd's tunables lower the memory's declared maximum to the cap, so
//! `memory.grow` past it returns -1 inside the guest, and a module whose initial size
//! is already larger is refused at instantiation.

use std::ptr::NonNull;

use wasmer::sys::vm::{
    MemoryError, MemoryStyle, TableStyle, VMMemory, VMMemoryDefinition, VMTable, VMTableDefinition,
};
use wasmer::sys::{BaseTunables, NativeEngineExt, Tunables};
use wasmer::{Engine, MemoryType, Pages, TableType};

/// Memory cap applied when neither the artifact nor the deployment sets one: 256 MiB.
pub const DEFAULT_MEMORY_PAGES: u32 = 4096;

pub struct CappedMemory {
    base: BaseTunables,
    cap: Pages,
}

impl CappedMemory {
    fn capped(&self, ty: &MemoryType) -> Result<MemoryType, MemoryError> {
        if ty.minimum > self.cap {
            return Err(MemoryError::Generic(format!(
                "the module needs {} pages of memory at start, above its cap of {} pages ({} KiB)",
                ty.minimum.0,
                self.cap.0,
                u64::from(self.cap.0) * 64
            )));
        }
        let mut ty = *ty;
        ty.maximum = Some(ty.maximum.map_or(self.cap, |m| m.min(self.cap)));
        Ok(ty)
    }
}

impl Tunables for CappedMemory {
    fn memory_style(&self, memory: &MemoryType) -> MemoryStyle {
        self.base.memory_style(memory)
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.base.table_style(table)
    }

    fn create_host_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
    ) -> Result<VMMemory, MemoryError> {
        self.base.create_host_memory(&self.capped(ty)?, style)
    }

    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        vm_definition_location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, MemoryError> {
        let ty = self.capped(ty)?;
        // SAFETY: forwarded unchanged from wasmer, which guarantees the location.
        unsafe {
            self.base
                .create_vm_memory(&ty, style, vm_definition_location)
        }
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.base.create_host_table(ty, style)
    }

    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        vm_definition_location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        // SAFETY: forwarded unchanged from wasmer, which guarantees the location.
        unsafe { self.base.create_vm_table(ty, style, vm_definition_location) }
    }
}

/// A headless engine whose memories are capped at `pages`.
pub fn engine(pages: u32) -> Engine {
    let mut engine = Engine::headless();
    engine.set_tunables(CappedMemory {
        base: BaseTunables::new(),
        cap: Pages(pages),
    });
    engine
}
