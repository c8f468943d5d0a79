//! A minimal C-STORE SCU (PS3.7 section 9.3.1) over dicom-ul's client association, used only to
//! fill the gateway with many tiny generated instances for the start-up measurement: storescu
//! would need a million input files on disk.

use std::time::Duration;

use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
use dicom_ul::ClientAssociationOptions;

use crate::data::{self, CT_IMAGE_STORAGE, EXPLICIT_VR_LE};

/// One implicit VR little endian command element (PS3.7 section 6.3.1).
fn cmd_elem(out: &mut Vec<u8>, elem: u16, value: &[u8]) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&v);
}

/// The C-STORE-RQ command set.
fn c_store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(160);
    cmd_elem(&mut body, 0x0002, sop_class.as_bytes());
    cmd_elem(&mut body, 0x0100, &0x0001u16.to_le_bytes());
    cmd_elem(&mut body, 0x0110, &message_id.to_le_bytes());
    cmd_elem(&mut body, 0x0700, &0u16.to_le_bytes());
    cmd_elem(&mut body, 0x0800, &0u16.to_le_bytes());
    cmd_elem(&mut body, 0x1000, sop_instance.as_bytes());
    let mut out = Vec::with_capacity(body.len() + 12);
    cmd_elem(
        &mut out,
        0x0000,
        &u32::try_from(body.len()).unwrap_or(0).to_le_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

/// Status (0000,0900) of a response command set.
fn status_of(cmd: &[u8]) -> Option<u16> {
    let mut p = 0usize;
    while p + 8 <= cmd.len() {
        let elem = u16::from_le_bytes([cmd[p + 2], cmd[p + 3]]);
        let len = u32::from_le_bytes([cmd[p + 4], cmd[p + 5], cmd[p + 6], cmd[p + 7]]) as usize;
        let v = cmd.get(p + 8..p + 8 + len)?;
        if elem == 0x0900 && len == 2 {
            return Some(u16::from_le_bytes([v[0], v[1]]));
        }
        p += 8 + len;
    }
    None
}

/// Sends tiny instances `range` to `addr` on one association. Returns how many were stored.
pub fn send_tiny(addr: &str, called_ae: &str, range: std::ops::Range<u64>) -> Result<u64, String> {
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("BENCH")
        .called_ae_title(called_ae)
        .with_presentation_context(CT_IMAGE_STORAGE, vec![EXPLICIT_VR_LE])
        .read_timeout(Duration::from_secs(120))
        .write_timeout(Duration::from_secs(120))
        .establish(addr)
        .map_err(|e| format!("association with {addr}: {e}"))?;
    // Nagle would hold the data PDU behind the command PDU until the peer's delayed ACK.
    assoc
        .inner_stream()
        .set_nodelay(true)
        .map_err(|e| e.to_string())?;
    let ctx = assoc
        .presentation_contexts()
        .first()
        .map(|c| c.id)
        .ok_or("no presentation context accepted")?;
    let mut stored = 0;
    for n in range {
        let (sop, dataset) = data::tiny_instance(n);
        let id = u16::try_from(n % 65_000).unwrap_or(0) + 1;
        for (value_type, data) in [
            (
                PDataValueType::Command,
                c_store_rq(id, CT_IMAGE_STORAGE, &sop),
            ),
            (PDataValueType::Data, dataset),
        ] {
            assoc
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: ctx,
                        value_type,
                        is_last: true,
                        data,
                    }],
                })
                .map_err(|e| format!("send: {e}"))?;
        }
        match assoc.receive().map_err(|e| format!("receive: {e}"))? {
            Pdu::PData { data } => {
                let status = data.first().and_then(|v| status_of(&v.data));
                if status != Some(0) {
                    return Err(format!("C-STORE of tiny instance {n}: status {status:?}"));
                }
                stored += 1;
            }
            other => return Err(format!("unexpected answer to C-STORE: {other:?}")),
        }
    }
    assoc.release().map_err(|e| format!("release: {e}"))?;
    Ok(stored)
}
