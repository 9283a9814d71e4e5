//! `kilnd conformance SCRIPT --trust KEY`: replays a spec-test script compiled by
//! `kiln conformance` on the device itself. Every module goes through the same
//! verify-then-load path as `kilnd run`; each command prints one outcome line.

use std::collections::HashMap;
use std::io::{self, Write};

use kiln_protocol::keys::TrustedKeys;
use kiln_protocol::script::{
    v128_matches, Action, Command, Expect, Instantiation, Outcome, Pattern, ScriptV1, Value,
};
use wasmer::sys::NativeEngineExt;
use wasmer::{
    Engine, Extern, ExternRef, Function, Global, Imports, Instance, InstantiationError, Memory,
    MemoryType, Store, Table, TableType, Type,
};

use wasmer_types::TrapCode;

use crate::sandbox::load::load_bytes;

/// Pass and fail counts of one replay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

struct Replay<'a> {
    trust: &'a TrustedKeys,
    engine: Engine,
    store: Store,
    spectest: HashMap<&'static str, Extern>,
    named: HashMap<String, Instance>,
    registered: HashMap<String, Instance>,
    current: Option<Instance>,
}

pub fn replay(script: &ScriptV1, trust: &TrustedKeys, out: &mut impl Write) -> io::Result<Tally> {
    let engine = Engine::headless();
    let mut store = Store::new(engine.clone());
    let spectest = spectest(&mut store);
    let mut replay = Replay {
        trust,
        engine,
        store,
        spectest,
        named: HashMap::new(),
        registered: HashMap::new(),
        current: None,
    };
    let mut tally = Tally::default();
    for command in &script.commands {
        let outcome = match replay.run(command) {
            Ok(()) => {
                tally.passed += 1;
                Outcome::Ok(command.line())
            }
            Err(why) => {
                tally.failed += 1;
                Outcome::Fail(command.line(), why)
            }
        };
        // One flushed line per command: if the device dies, what ran is still reported.
        writeln!(out, "{}", outcome.to_line())?;
        out.flush()?;
    }
    Ok(tally)
}

/// The `spectest` module every spec script may import from.
fn spectest(store: &mut Store) -> HashMap<&'static str, Extern> {
    let mut m: HashMap<&'static str, Extern> = HashMap::new();
    m.insert("print", Function::new_typed(store, || {}).into());
    m.insert("print_i32", Function::new_typed(store, |_: i32| {}).into());
    m.insert("print_i64", Function::new_typed(store, |_: i64| {}).into());
    m.insert("print_f32", Function::new_typed(store, |_: f32| {}).into());
    m.insert("print_f64", Function::new_typed(store, |_: f64| {}).into());
    m.insert(
        "print_i32_f32",
        Function::new_typed(store, |_: i32, _: f32| {}).into(),
    );
    m.insert(
        "print_f64_f64",
        Function::new_typed(store, |_: f64, _: f64| {}).into(),
    );
    m.insert(
        "global_i32",
        Global::new(store, wasmer::Value::I32(666)).into(),
    );
    m.insert(
        "global_i64",
        Global::new(store, wasmer::Value::I64(666)).into(),
    );
    m.insert(
        "global_f32",
        Global::new(store, wasmer::Value::F32(666.6)).into(),
    );
    m.insert(
        "global_f64",
        Global::new(store, wasmer::Value::F64(666.6)).into(),
    );
    if let Ok(table) = Table::new(
        store,
        TableType::new(Type::FuncRef, 10, Some(20)),
        wasmer::Value::FuncRef(None),
    ) {
        m.insert("table", table.into());
    }
    if let Ok(memory) = Memory::new(store, MemoryType::new(1, Some(2), false)) {
        m.insert("memory", memory.into());
    }
    m
}

impl Replay<'_> {
    fn run(&mut self, command: &Command) -> Result<(), String> {
        match command {
            Command::Module {
                name,
                artifact,
                expect,
                ..
            } => self.module(name.as_deref(), artifact, expect),
            Command::Register {
                module, as_name, ..
            } => {
                let instance = self.instance(module.as_deref())?.clone();
                self.registered.insert(as_name.clone(), instance);
                Ok(())
            }
            Command::Action { action, expect, .. } => {
                let result = self.act(action);
                check(&self.store, result, expect)
            }
            Command::Broken { name, why, .. } => {
                self.current = None;
                if let Some(name) = name {
                    self.named.remove(name);
                }
                Err(why.clone())
            }
        }
    }

    fn module(
        &mut self,
        name: Option<&str>,
        artifact: &[u8],
        expect: &Instantiation,
    ) -> Result<(), String> {
        // A module that fails to load or link must not leave its predecessor current.
        self.current = None;
        let loaded = load_bytes(artifact.to_vec(), self.trust, None, |_| self.engine.clone())
            .map_err(|f| f.message)?;
        let mut imports = Imports::new();
        for import in loaded.module.imports() {
            let found = if import.module() == "spectest" {
                self.spectest.get(import.name()).cloned()
            } else {
                self.registered
                    .get(import.module())
                    .and_then(|i| i.exports.get_extern(import.name()).cloned())
            };
            if let Some(ext) = found {
                imports.define(import.module(), import.name(), ext);
            }
        }
        let result = Instance::new(&mut self.store, &loaded.module, &imports);
        match (result, expect) {
            (Ok(instance), Instantiation::Succeeds) => {
                if let Some(name) = name {
                    self.named.insert(name.to_string(), instance.clone());
                }
                self.current = Some(instance);
                Ok(())
            }
            (Ok(_), other) => Err(format!("instantiated, expected {other:?}")),
            (Err(InstantiationError::Link(_)), Instantiation::Unlinkable(_)) => Ok(()),
            (Err(InstantiationError::Start(_)), Instantiation::Traps(_)) => Ok(()),
            (Err(e), _) => Err(format!("instantiation: {e}")),
        }
    }

    fn instance(&self, name: Option<&str>) -> Result<&Instance, String> {
        match name {
            Some(n) => self.named.get(n).ok_or_else(|| format!("no module `{n}`")),
            None => self
                .current
                .as_ref()
                .ok_or_else(|| "no module instantiated".to_string()),
        }
    }

    fn act(&mut self, action: &Action) -> Result<Vec<wasmer::Value>, Stop> {
        match action {
            Action::Invoke {
                module,
                field,
                args,
            } => {
                let func = self
                    .instance(module.as_deref())
                    .and_then(|i| i.exports.get_function(field).map_err(|e| e.to_string()))
                    .map_err(Stop::Error)?
                    .clone();
                let args: Vec<wasmer::Value> = args.iter().map(|a| self.value(a)).collect();
                func.call(&mut self.store, &args)
                    .map(|r| r.into_vec())
                    .map_err(|e| {
                        if e.is_exception() {
                            Stop::Exception
                        } else {
                            e.to_trap()
                                .map_or_else(|| Stop::Error("host error".into()), Stop::Trap)
                        }
                    })
            }
            Action::Get { module, global } => {
                let g = self
                    .instance(module.as_deref())
                    .and_then(|i| i.exports.get_global(global).map_err(|e| e.to_string()))
                    .map_err(Stop::Error)?
                    .clone();
                Ok(vec![g.get(&mut self.store)])
            }
        }
    }

    fn value(&mut self, v: &Value) -> wasmer::Value {
        match v {
            Value::I32(x) => wasmer::Value::I32(*x),
            Value::I64(x) => wasmer::Value::I64(*x),
            Value::F32(bits) => wasmer::Value::F32(f32::from_bits(*bits)),
            Value::F64(bits) => wasmer::Value::F64(f64::from_bits(*bits)),
            Value::V128(x) => wasmer::Value::V128(*x),
            Value::NullFuncRef => wasmer::Value::FuncRef(None),
            Value::NullExternRef => wasmer::Value::ExternRef(None),
            Value::ExternRef(n) => {
                wasmer::Value::ExternRef(Some(ExternRef::new(&mut self.store, *n)))
            }
        }
    }
}

/// How an action ended when it did not return.
enum Stop {
    Trap(TrapCode),
    Exception,
    /// The action could not run (missing module or export, host failure).
    Error(String),
}

fn check(
    store: &Store,
    result: Result<Vec<wasmer::Value>, Stop>,
    expect: &Expect,
) -> Result<(), String> {
    match (result, expect) {
        (Err(Stop::Error(why)), _) => Err(why),
        (Err(Stop::Exception), Expect::Throws) => Ok(()),
        (Err(Stop::Exception), _) => Err("uncaught exception".into()),
        (Ok(values), Expect::Throws) => Err(format!(
            "expected an exception, got {:?}",
            values.iter().map(show).collect::<Vec<_>>()
        )),
        (Ok(_), Expect::Completes) => Ok(()),
        (Ok(values), Expect::Returns(patterns)) => {
            if values.len() != patterns.len() {
                return Err(format!(
                    "expected {} results, got {values:?}",
                    patterns.len()
                ));
            }
            for (value, pattern) in values.iter().zip(patterns) {
                if !matches(store, value, pattern) {
                    return Err(format!("expected {pattern:?}, got {}", show(value)));
                }
            }
            Ok(())
        }
        (Ok(values), Expect::Traps(msg) | Expect::Exhausts(msg)) => Err(format!(
            "expected trap `{msg}`, got {:?}",
            values.iter().map(show).collect::<Vec<_>>()
        )),
        (Err(Stop::Trap(TrapCode::StackOverflow)), Expect::Exhausts(_)) => Ok(()),
        (Err(Stop::Trap(code)), Expect::Exhausts(msg)) => Err(format!(
            "expected `{msg}`, trapped with `{}`",
            code.message()
        )),
        // Any trap satisfies assert_trap: the exact wording is the engine's, not behaviour.
        (Err(Stop::Trap(_)), Expect::Traps(_)) => Ok(()),
        (Err(Stop::Trap(code)), _) => Err(format!("trapped: {}", code.message())),
    }
}

fn matches(store: &Store, value: &wasmer::Value, pattern: &Pattern) -> bool {
    use wasmer::Value as V;
    match (pattern, value) {
        (Pattern::Either(ps), _) => ps.iter().any(|p| matches(store, value, p)),
        (Pattern::I32(x), V::I32(y)) => x == y,
        (Pattern::I64(x), V::I64(y)) => x == y,
        (Pattern::F32(f), V::F32(y)) => f.matches(y.to_bits()),
        (Pattern::F64(f), V::F64(y)) => f.matches(y.to_bits()),
        (Pattern::V128(lanes), V::V128(y)) => v128_matches(lanes, *y),
        (Pattern::NullRef, V::FuncRef(None) | V::ExternRef(None)) => true,
        (Pattern::FuncRef, V::FuncRef(Some(_))) => true,
        (Pattern::ExternRef(None), V::ExternRef(Some(_))) => true,
        (Pattern::ExternRef(Some(n)), V::ExternRef(Some(r))) => r.downcast::<u32>(store) == Some(n),
        _ => false,
    }
}

fn show(value: &wasmer::Value) -> String {
    match value {
        wasmer::Value::F32(f) => format!("f32 {f} ({:#010x})", f.to_bits()),
        wasmer::Value::F64(f) => format!("f64 {f} ({:#018x})", f.to_bits()),
        wasmer::Value::V128(v) => format!("v128 {v:#034x}"),
        other => format!("{other:?}"),
    }
}
