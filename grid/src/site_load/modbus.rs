//! Modbus TCP power meter: decode one figure from holding or input
//! registers.
//!
//! Meters disagree on layout, so everything is configured: register table,
//! start address (0-based, as sent on the wire), data type, word order of
//! 32-bit values (most meters send the high word first; some, e.g. many
//! Schneider and Carlo Gavazzi models, the low word first) and a scale
//! factor to kW.

use super::MeterError;

/// Which register table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterKind {
    /// Function 0x03.
    Holding,
    /// Function 0x04.
    Input,
}

/// How the registers encode the figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single.
    F32,
}

impl DataType {
    /// Registers it spans.
    pub fn count(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            _ => 2,
        }
    }
}

/// Order of the two registers of a 32-bit value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordOrder {
    /// High word at the lower address (big-endian, "ABCD").
    HighFirst,
    /// Low word at the lower address ("CDAB").
    LowFirst,
}

/// A meter and where its figure is.
#[derive(Clone, Debug, PartialEq)]
pub struct ModbusMeter {
    /// Meter address, `host:port` (a name, an IPv4 address or `[IPv6]`; 502
    /// is the Modbus default). A name is looked up at every connect, each
    /// address it resolves to tried in turn.
    pub addr: String,
    /// Unit (slave) id.
    pub unit: u8,
    /// Register table.
    pub kind: RegisterKind,
    /// First register, 0-based wire address.
    pub address: u16,
    /// Encoding.
    pub data_type: DataType,
    /// Word order of 32-bit types.
    pub word_order: WordOrder,
    /// Multiplies the raw value to give kW (a meter reporting W: 0.001).
    pub scale: f64,
}

impl ModbusMeter {
    /// The load, kW, in the registers read (not range-checked).
    pub fn decode(&self, regs: &[u16]) -> Result<f64, MeterError> {
        Ok(decode(regs, self.data_type, self.word_order)? * self.scale)
    }
}

/// The raw value in `regs` (exactly `data_type.count()` registers).
pub fn decode(regs: &[u16], data_type: DataType, order: WordOrder) -> Result<f64, MeterError> {
    if regs.len() != usize::from(data_type.count()) {
        return Err(MeterError::Format(format!(
            "modbus: {} registers for {data_type:?} (want {})",
            regs.len(),
            data_type.count()
        )));
    }
    let u32_of = |r: &[u16]| -> u32 {
        let (hi, lo) = match order {
            WordOrder::HighFirst => (r[0], r[1]),
            WordOrder::LowFirst => (r[1], r[0]),
        };
        (u32::from(hi) << 16) | u32::from(lo)
    };
    Ok(match data_type {
        DataType::U16 => f64::from(regs[0]),
        DataType::I16 => f64::from(regs[0] as i16),
        DataType::U32 => f64::from(u32_of(regs)),
        DataType::I32 => f64::from(u32_of(regs) as i32),
        DataType::F32 => f64::from(f32::from_bits(u32_of(regs))),
    })
}

/// One read from the meter over a connection the caller keeps
/// (reconnecting after any error).
pub(crate) async fn read(
    ctx: &mut tokio_modbus::client::Context,
    m: &ModbusMeter,
) -> Result<f64, MeterError> {
    use tokio_modbus::client::Reader;
    let n = m.data_type.count();
    let res = match m.kind {
        RegisterKind::Holding => ctx.read_holding_registers(m.address, n).await,
        RegisterKind::Input => ctx.read_input_registers(m.address, n).await,
    };
    let regs = res
        .map_err(|e| MeterError::Transport(format!("modbus {}: {e}", m.addr)))?
        .map_err(|code| MeterError::ModbusException(format!("{code:?} from {}", m.addr)))?;
    m.decode(&regs)
}

/// Open a connection to the meter.
pub(crate) async fn connect(m: &ModbusMeter) -> Result<tokio_modbus::client::Context, MeterError> {
    let stream = tokio::net::TcpStream::connect(m.addr.as_str())
        .await
        .map_err(|e| MeterError::Transport(format!("modbus connect {}: {e}", m.addr)))?;
    Ok(tokio_modbus::client::tcp::attach_slave(
        stream,
        tokio_modbus::Slave(m.unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_type_and_word_order() {
        use DataType::*;
        use WordOrder::*;
        assert_eq!(decode(&[500], U16, HighFirst), Ok(500.0));
        assert_eq!(decode(&[0xFFFF], I16, HighFirst), Ok(-1.0));
        assert_eq!(decode(&[0x0001, 0x86A0], U32, HighFirst), Ok(100_000.0));
        assert_eq!(decode(&[0x86A0, 0x0001], U32, LowFirst), Ok(100_000.0));
        assert_eq!(decode(&[0xFFFF, 0xFFFE], I32, HighFirst), Ok(-2.0));
        let bits = 412.25f32.to_bits();
        let (hi, lo) = ((bits >> 16) as u16, bits as u16);
        assert_eq!(decode(&[hi, lo], F32, HighFirst), Ok(412.25));
        assert_eq!(decode(&[lo, hi], F32, LowFirst), Ok(412.25));
        let nan = f32::NAN.to_bits();
        assert!(decode(&[(nan >> 16) as u16, nan as u16], F32, HighFirst)
            .unwrap()
            .is_nan());
    }

    #[test]
    fn wrong_register_count_is_an_error() {
        assert!(matches!(
            decode(&[1], DataType::U32, WordOrder::HighFirst),
            Err(MeterError::Format(_))
        ));
        assert!(matches!(
            decode(&[], DataType::U16, WordOrder::HighFirst),
            Err(MeterError::Format(_))
        ));
    }

    #[test]
    fn scale_applies() {
        let m = ModbusMeter {
            addr: "127.0.0.1:502".into(),
            unit: 1,
            kind: RegisterKind::Holding,
            address: 0,
            data_type: DataType::U32,
            word_order: WordOrder::HighFirst,
            scale: 0.001,
        };
        assert_eq!(m.decode(&[0x0001, 0x86A0]), Ok(100.0));
    }
}
