//! smtpguard's datapath: one decision pipeline behind three hooks.
//!
//! `xdp_ingress` sits on the host uplink; `tc_ingress` and `tc_egress` on
//! clsact, for the uplink's egress side and for tenant-facing interfaces.
//! Which policy direction a hook judges by is runtime configuration
//! (`Runtime::hook_direction`), so the same pipeline serves every hook.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
// Inline assembly for unaligned packet loads (frame::load).
#![feature(asm_experimental_arch)]
#![expect(internal_features, reason = "atomic_cxchg: the BPF target has no stable CAS")]

mod acl;
mod atomic;
mod config;
mod decide;
mod events;
mod frame;
mod opaque;
mod parse;
mod reset;
mod shadow;
mod smtp;
mod sources;
mod stats;
mod tenants;
mod trace;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use policy_common::hook;

use crate::{
    decide::Exit,
    frame::{SkbFrame, XdpFrame},
};

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    match decide::judge(&XdpFrame(&ctx), hook::XDP_INGRESS) {
        Exit::Pass => xdp_action::XDP_PASS,
        Exit::Drop => xdp_action::XDP_DROP,
        Exit::Reset => reset::xdp(&ctx),
    }
}

/// On tenant interfaces: what a VM sends. A reset goes back to the VM.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match decide::judge(&SkbFrame(&ctx), hook::TC_INGRESS) {
        Exit::Reset => reset::tc(&ctx, false),
        other => tc_verdict(other),
    }
}

/// On the uplink's egress: what the host itself sends (forwarded tenant
/// traffic was judged on arrival). A reset goes into the host.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    match decide::judge(&SkbFrame(&ctx), hook::TC_EGRESS) {
        Exit::Reset => reset::tc(&ctx, true),
        other => tc_verdict(other),
    }
}

/// Passing lets later clsact programs have their say (`TC_ACT_UNSPEC`).
#[inline(always)]
fn tc_verdict(exit: Exit) -> i32 {
    match exit {
        Exit::Pass => TC_ACT_UNSPEC,
        Exit::Drop | Exit::Reset => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
