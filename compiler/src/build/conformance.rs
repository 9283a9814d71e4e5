//! Turns a `.wast` spec script into a [`ScriptV1`] for one target: every module is
//! compiled and signed by the real pipeline ([`crate::build::aot`]); checks that need no
//! device (`assert_invalid`, `assert_malformed`) are decided here.

use kiln_protocol::keys::SecretKey;
use kiln_protocol::script::{
    Action, Command, Expect, Float, Instantiation, Lane, Pattern, ScriptV1, Value,
};
use wast::core::{AbstractHeapType, HeapType, NanPattern, V128Pattern, WastArgCore, WastRetCore};
use wast::lexer::Lexer;
use wast::parser::{self, ParseBuffer};
use wast::token::Span;
use wast::{QuoteWat, Wast, WastArg, WastDirective, WastExecute, WastInvoke, WastRet};

use crate::build::aot::{self, CompileOptions};
use crate::build::targets::ResolvedTarget;

/// What the host decided for one directive without a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOutcome {
    Pass(u32),
    Fail(u32, String),
    Skip(u32, String),
}

pub struct Translated {
    pub script: ScriptV1,
    pub host: Vec<HostOutcome>,
}

/// Compiles every module of `text` for `target` and returns the device script plus
/// the host-side outcomes. Errors only when the file itself does not parse.
pub fn translate(
    file: &str,
    text: &str,
    target: &ResolvedTarget,
    key: &SecretKey,
) -> Result<Translated, String> {
    // The spec suite tests names with bidi and zero-width characters on purpose.
    let mut lexer = Lexer::new(text);
    lexer.allow_confusing_unicode(true);
    let buf = ParseBuffer::new_with_lexer(lexer).map_err(|e| one_line(&e.to_string()))?;
    let wast: Wast = parser::parse(&buf).map_err(|e| one_line(&e.to_string()))?;
    let mut t = Translator {
        text,
        target,
        key,
        commands: Vec::new(),
        host: Vec::new(),
    };
    for directive in wast.directives {
        t.directive(directive);
    }
    Ok(Translated {
        script: ScriptV1 {
            source: file.to_string(),
            commands: t.commands,
        },
        host: t.host,
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Translator<'t> {
    text: &'t str,
    target: &'t ResolvedTarget,
    key: &'t SecretKey,
    commands: Vec<Command>,
    host: Vec<HostOutcome>,
}

/// A directive kilnd cannot express yet, with the reason it is skipped.
struct Unsupported(String);

impl Translator<'_> {
    fn line(&self, span: Span) -> u32 {
        span.linecol_in(self.text).0 as u32 + 1
    }

    fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, String> {
        let opts = CompileOptions {
            target: self.target.clone(),
            name: "spectest".into(),
            version: 1,
            created_at: None,
            settings: Default::default(),
            bounds_checks: false,
        };
        aot::compile(wasm, &opts, self.key)
            .map(|c| c.bytes)
            .map_err(|e| one_line(&e.to_string()))
    }

    fn encode_and_compile(&self, module: &mut QuoteWat<'_>) -> Result<Vec<u8>, String> {
        module
            .encode()
            .map_err(|e| one_line(&e.to_string()))
            .and_then(|wasm| self.compile(&wasm))
    }

    fn directive(&mut self, d: WastDirective<'_>) {
        let line = self.line(d.span());
        match d {
            WastDirective::Module(mut module) => {
                let name = module.name().map(|id| id.name().to_string());
                self.module(line, name, &mut module, Instantiation::Succeeds);
            }
            WastDirective::AssertUnlinkable {
                module, message, ..
            } => {
                let expect = Instantiation::Unlinkable(message.into());
                self.module(line, None, &mut QuoteWat::Wat(module), expect);
            }
            WastDirective::AssertTrap {
                exec: WastExecute::Wat(module),
                message,
                ..
            } => {
                let expect = Instantiation::Traps(message.into());
                self.module(line, None, &mut QuoteWat::Wat(module), expect);
            }
            WastDirective::AssertInvalid {
                mut module,
                message,
                ..
            }
            | WastDirective::AssertMalformed {
                mut module,
                message,
                ..
            } => {
                let outcome = match module.encode() {
                    Err(_) => HostOutcome::Pass(line),
                    Ok(wasm) => match self.compile(&wasm) {
                        Err(_) => HostOutcome::Pass(line),
                        Ok(_) => HostOutcome::Fail(
                            line,
                            format!("compiled, but the module should be rejected: {message}"),
                        ),
                    },
                };
                self.host.push(outcome);
            }
            WastDirective::Register { name, module, .. } => self.commands.push(Command::Register {
                line,
                module: module.map(|id| id.name().to_string()),
                as_name: name.to_string(),
            }),
            WastDirective::Invoke(invoke) => {
                self.action(line, invoke_action(&invoke), Ok(Expect::Completes))
            }
            WastDirective::AssertReturn { exec, results, .. } => {
                let expect = results
                    .iter()
                    .map(pattern)
                    .collect::<Result<Vec<_>, _>>()
                    .map(Expect::Returns);
                self.action(line, execute_action(&exec), expect);
            }
            WastDirective::AssertTrap { exec, message, .. } => {
                self.action(
                    line,
                    execute_action(&exec),
                    Ok(Expect::Traps(message.into())),
                );
            }
            WastDirective::AssertExhaustion { call, message, .. } => {
                self.action(
                    line,
                    invoke_action(&call),
                    Ok(Expect::Exhausts(message.into())),
                );
            }
            // A definition is only validated, which compiling for the target does.
            WastDirective::ModuleDefinition(mut module) => {
                self.host.push(match self.encode_and_compile(&mut module) {
                    Ok(_) => HostOutcome::Pass(line),
                    Err(why) => HostOutcome::Fail(line, format!("kiln cannot compile it: {why}")),
                });
            }
            WastDirective::ModuleInstance { .. } => self.skip(
                line,
                "module instances (wasm 3.0 script syntax) are not replayed yet",
            ),
            WastDirective::AssertException { exec, .. } => {
                self.action(line, execute_action(&exec), Ok(Expect::Throws))
            }
            WastDirective::AssertSuspension { .. } => {
                self.skip(line, "stack switching is not supported by wasmer")
            }
            WastDirective::Thread(_) | WastDirective::Wait { .. } => {
                self.skip(line, "threads are not supported by kilnd")
            }
            WastDirective::AssertInvalidCustom { .. }
            | WastDirective::AssertMalformedCustom { .. } => {
                self.skip(line, "custom-section assertions are not checked")
            }
        }
    }

    fn skip(&mut self, line: u32, why: &str) {
        self.host.push(HostOutcome::Skip(line, why.into()));
    }

    fn module(
        &mut self,
        line: u32,
        name: Option<String>,
        module: &mut QuoteWat<'_>,
        expect: Instantiation,
    ) {
        if matches!(module, QuoteWat::QuoteComponent(..))
            || matches!(module, QuoteWat::Wat(wast::Wat::Component(_)))
        {
            return self.skip(line, "components are not supported");
        }
        self.commands.push(match self.encode_and_compile(module) {
            Ok(artifact) => Command::Module {
                line,
                name,
                artifact,
                expect,
            },
            Err(why) => Command::Broken {
                line,
                name,
                why: format!("kiln cannot compile it: {why}"),
            },
        });
    }

    fn action(
        &mut self,
        line: u32,
        action: Result<Action, Unsupported>,
        expect: Result<Expect, Unsupported>,
    ) {
        match (action, expect) {
            (Ok(action), Ok(expect)) => self.commands.push(Command::Action {
                line,
                action,
                expect,
            }),
            (Err(Unsupported(why)), _) | (_, Err(Unsupported(why))) => self.skip(line, &why),
        }
    }
}

fn invoke_action(invoke: &WastInvoke<'_>) -> Result<Action, Unsupported> {
    Ok(Action::Invoke {
        module: invoke.module.map(|id| id.name().to_string()),
        field: invoke.name.to_string(),
        args: invoke.args.iter().map(value).collect::<Result<_, _>>()?,
    })
}

fn execute_action(exec: &WastExecute<'_>) -> Result<Action, Unsupported> {
    match exec {
        WastExecute::Invoke(invoke) => invoke_action(invoke),
        WastExecute::Get { module, global, .. } => Ok(Action::Get {
            module: module.map(|id| id.name().to_string()),
            global: global.to_string(),
        }),
        WastExecute::Wat(_) => Err(Unsupported("module as an action".into())),
    }
}

fn value(arg: &WastArg<'_>) -> Result<Value, Unsupported> {
    let WastArg::Core(arg) = arg else {
        return Err(Unsupported("component values".into()));
    };
    Ok(match arg {
        WastArgCore::I32(x) => Value::I32(*x),
        WastArgCore::I64(x) => Value::I64(*x),
        WastArgCore::F32(x) => Value::F32(x.bits),
        WastArgCore::F64(x) => Value::F64(x.bits),
        WastArgCore::V128(x) => Value::V128(u128::from_le_bytes(x.to_le_bytes())),
        WastArgCore::RefNull(HeapType::Abstract {
            ty: AbstractHeapType::Func,
            ..
        }) => Value::NullFuncRef,
        WastArgCore::RefNull(HeapType::Abstract {
            ty: AbstractHeapType::Extern,
            ..
        }) => Value::NullExternRef,
        WastArgCore::RefExtern(n) => Value::ExternRef(*n),
        other => return Err(Unsupported(format!("argument {other:?} (GC references)"))),
    })
}

fn float32(p: &NanPattern<wast::token::F32>) -> Float<u32> {
    match p {
        NanPattern::CanonicalNan => Float::CanonicalNan,
        NanPattern::ArithmeticNan => Float::ArithmeticNan,
        NanPattern::Value(v) => Float::Bits(v.bits),
    }
}

fn float64(p: &NanPattern<wast::token::F64>) -> Float<u64> {
    match p {
        NanPattern::CanonicalNan => Float::CanonicalNan,
        NanPattern::ArithmeticNan => Float::ArithmeticNan,
        NanPattern::Value(v) => Float::Bits(v.bits),
    }
}

fn pattern(ret: &WastRet<'_>) -> Result<Pattern, Unsupported> {
    let WastRet::Core(ret) = ret else {
        return Err(Unsupported("component results".into()));
    };
    core_pattern(ret)
}

fn core_pattern(ret: &WastRetCore<'_>) -> Result<Pattern, Unsupported> {
    Ok(match ret {
        WastRetCore::I32(x) => Pattern::I32(*x),
        WastRetCore::I64(x) => Pattern::I64(*x),
        WastRetCore::F32(p) => Pattern::F32(float32(p)),
        WastRetCore::F64(p) => Pattern::F64(float64(p)),
        WastRetCore::V128(v) => Pattern::V128(match v {
            V128Pattern::I8x16(l) => l.iter().map(|x| Lane::I8(*x)).collect(),
            V128Pattern::I16x8(l) => l.iter().map(|x| Lane::I16(*x)).collect(),
            V128Pattern::I32x4(l) => l.iter().map(|x| Lane::I32(*x)).collect(),
            V128Pattern::I64x2(l) => l.iter().map(|x| Lane::I64(*x)).collect(),
            V128Pattern::F32x4(l) => l.iter().map(|p| Lane::F32(float32(p))).collect(),
            V128Pattern::F64x2(l) => l.iter().map(|p| Lane::F64(float64(p))).collect(),
        }),
        WastRetCore::RefNull(_) => Pattern::NullRef,
        WastRetCore::RefFunc(_) => Pattern::FuncRef,
        WastRetCore::RefExtern(n) => Pattern::ExternRef(*n),
        WastRetCore::Either(options) => {
            Pattern::Either(options.iter().map(core_pattern).collect::<Result<_, _>>()?)
        }
        other => return Err(Unsupported(format!("result {other:?} (GC references)"))),
    })
}
